"""Learning curve of the default student: one training schedule of E epochs, the holdout scored after each epoch.

The same example data, holdout and scoring as ``bench/quality.py`` (the first 24 holdout traces of the hash
split; students train on the first N of the others), the product's LoRA trainer (TRL + PEFT, shared-prefix
batches, loss on the answer), and after every epoch the adapter merged in place (``merge_adapter``) and the
holdout generated in batches of 8, greedy, then unmerged for the next epoch. It shows how agreement with the
teacher grows with epochs, which ``bench/quality.py`` (one number per finished run) cannot. Prints one JSON line
per epoch, then a summary line. Hours of CPU for large N; used to choose the defaults:

    .venv/bin/python bench/quality_curve.py --n 136 --epochs 6 --lr 3e-3 --bs 8 --out bench/results/x.json
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=200, help="training traces")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the one schedule")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bs", type=int, default=8, help="batch size")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    ap.add_argument("--kind", default="answer", choices=("answer", "reasoning"))
    ap.add_argument("--sched", default="linear", help="transformers scheduler name")
    ap.add_argument("--eval-every", type=int, default=1, help="score the holdout every this many epochs")
    ap.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    a = ap.parse_args()

    from quality import load_traces, split
    from transformers import PrinterCallback, TrainerCallback

    from schemas import get_task
    from trainer.close_loop.evaluate import evaluate_examples, examples_from_traces
    from trainer.dataset import build_dataset, inference_messages, phase_examples
    from trainer.inference import generate_batch
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import load_base_for_training, make_lora_model, make_trl_trainer

    pool, hold = split(load_traces(), 24)
    cfg = SFTConfig(tier3_phases=f"{a.kind}:{a.epochs}", tier3_holdout_fraction=0.0, tier3_backend="trl",
                    tier3_learning_rate=a.lr, tier3_batch_size=a.bs, tier3_lora_r=a.r, tier3_lora_alpha=2 * a.r,
                    tier3_lr_scheduler=a.sched)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tier3-curve-"))
    ds = build_dataset(pool[: a.n], cfg, tmp / "data")
    model, tok = load_base_for_training(cfg, False)
    model = make_lora_model(model, cfg)
    reasoning = a.kind == "reasoning"
    prompts = {t.experience_id: inference_messages(t.experience, reasoning=reasoning) for t in hold}
    examples = [type(e)(e.experience_id, prompts[e.experience_id], e.teacher_answer, e.baseline_response)
                for e in examples_from_traces(hold)]
    task = get_task("widget_selector")
    curve: list[dict[str, object]] = []

    def evaluate(epoch: int) -> None:
        model.eval()
        model.merge_adapter()
        t0 = time.perf_counter()
        inner = model.get_base_model()
        res = evaluate_examples(task, examples, None,  # type: ignore[arg-type]  # batches only
                                generate_batch=lambda ps: generate_batch(inner, tok, ps, 256 if reasoning else 64),
                                batch_size=8, latency_samples=0)
        model.unmerge_adapter()
        model.train()
        m = res.metrics
        row = {"epoch": epoch, **{k: m.get(k) for k in ("json_valid_rate", "schema_valid_rate", "set_f1_widgets",
                                                          "f1", "exact_match")},
               "eval_s": time.perf_counter() - t0, "wrong": [r.output for r in res.rows if r.student.f1 < 1][:6]}
        curve.append(row)
        print(json.dumps(row), flush=True)

    class EveryEpoch(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, args: object, state: object, control: object, **kw: object) -> None:
            epoch = round(state.epoch)  # type: ignore[attr-defined]
            if epoch % a.eval_every == 0 or epoch == a.epochs:
                evaluate(epoch)

    t0 = time.perf_counter()
    trainer = make_trl_trainer(model, tok, phase_examples(ds, a.kind), cfg, cfg.phases[0], tmp, on_cuda=False,
                               callbacks=[EveryEpoch()])
    trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    res = {"args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(a).items()},
           "n_train": ds.n_train, "wall_s": time.perf_counter() - t0, "loss": out.training_loss, "curve": curve,
           "losses": [h.get("loss") for h in trainer.state.log_history if "loss" in h]}
    print(json.dumps({k: v for k, v in res.items() if k != "curve"}))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
