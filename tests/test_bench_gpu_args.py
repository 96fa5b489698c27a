"""bench/train_gpu.py: QLoRA (--load-in-4bit) reaches the unsloth arm only; the TRL arm's config stays valid."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("train_gpu", ROOT / "bench" / "train_gpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_in_4bit_reaches_only_the_unsloth_arm(tmp_path: Path) -> None:
    bench = _bench()
    trl_cmd = bench.child_command("trl", tmp_path, 100, 4, True)
    unsloth_cmd = bench.child_command("unsloth", tmp_path, 100, 4, True)
    assert "--load-in-4bit" not in trl_cmd and unsloth_cmd[-1] == "--load-in-4bit"
    assert trl_cmd[trl_cmd.index("--child") + 1] == "trl"
    # the config each child builds: SFTConfig refuses 4-bit with TRL, so the TRL arm must get 16-bit
    assert bench.backend_config("trl", tmp_path, 4, True).tier3_load_in_4bit is False
    assert bench.backend_config("unsloth", tmp_path, 4, True).tier3_load_in_4bit is True
    assert bench.backend_config("unsloth", tmp_path, 4, False).tier3_load_in_4bit is False
