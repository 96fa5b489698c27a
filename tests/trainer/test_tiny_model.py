"""The tiny offline student: cached build, deterministic weights, tokenizer ids that survive save/load."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.tasks import get_task
from tests.synthetic import synthetic_traces
from trainer.tiny_model import (
    EOT_TOKEN,
    GGUF_PRE_TOKENIZER,
    build_tiny_model,
    cached_tiny_model,
    plain_chat_template,
)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_model()


def _texts() -> list[str]:
    task = get_task("widget_selector")
    t = synthetic_traces(1)[0]
    return [task.system_prompt, task.format_output(t.answer, t.reasoning), t.experience.messages[1].content,
            "Ünïcödé café 日本語 🙂 tabs\tand\r\nnewlines  double  spaces 1234567890 it's we'll"]


def test_ids_round_trip_after_save_and_load(tiny: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))  # what was trained, without transformers
    tok = AutoTokenizer.from_pretrained(tiny)
    # the qwen2 trap: a tokenizer class that rebuilds the pre-tokenizer would silently change ids
    assert "Qwen2" not in type(tok).__name__
    for text in _texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    resaved = tiny.parent / f"{tiny.name}-resaved-{time.monotonic_ns()}"
    tok.save_pretrained(resaved)
    tok2 = AutoTokenizer.from_pretrained(resaved)
    for text in _texts():
        assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_special_tokens_chat_template_and_gguf_declaration(tiny: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(tiny)
    cfg = AutoConfig.from_pretrained(tiny)
    assert cfg.model_type == "llama"
    assert tok.eos_token == EOT_TOKEN and cfg.eos_token_id == tok.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= cfg.vocab_size
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<answer>\n{}\n</answer>"}]
    out: Any = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert masked[-1] == tok.eos_token_id  # the end-of-turn token is a training target
    assert tok.decode(masked) == "<answer>\n{}\n</answer>" + EOT_TOKEN
    prompt: Any = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # llama.cpp's GGUF converter cannot recognise a freshly trained pre-tokenizer: the folder declares one
    assert json.loads((tiny / "tokenizer_config.json").read_text())["tier3_gguf_pre_tokenizer"] == GGUF_PRE_TOKENIZER
    assert json.loads((tiny / "config.json").read_text())["tier3_gguf_pre_tokenizer"] == GGUF_PRE_TOKENIZER
    plain = plain_chat_template(tok.chat_template)
    assert "{%- generation %}" not in plain and "endgeneration" not in plain
    assert (tiny / "chat_template.plain.jinja").read_text() == plain


def test_trl_accepts_the_template_for_assistant_only_loss(tiny: Path) -> None:
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = AutoTokenizer.from_pretrained(tiny)
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_build_is_cached_and_deterministic(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    assert build_tiny_model(tiny) == tiny  # already built: returned as is
    assert time.perf_counter() - t0 < 1.0
    other = build_tiny_model(tmp_path / "tiny")
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    a, b = load_file(str(tiny / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny.tmp")]  # no temp folder left


def test_torn_folder_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{")  # a crash mid-copy, no stamp
    build_tiny_model(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
