"""Export of the tiny model: GGUF read back matches the merged model; Ollama registration carries the digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map

from schemas import TrainingRun, decode
from tests.close_loop.conftest import TrainedRun
from tests.fakes.ollama_server import FakeOllama
from tests.kafka_utils import consume_values
from trainer.close_loop.export import CHATML_OLLAMA_TEMPLATE, export_run, register_with_ollama
from trainer.close_loop.settings import CloseLoopSettings


@pytest.mark.slow
def test_export_gguf_matches_merged_model_and_registers_with_ollama(
        trained_run: TrainedRun, make_settings: Callable[..., CloseLoopSettings], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    with FakeOllama() as ollama_srv:
        s = make_settings(cls=CloseLoopSettings, tier3_ollama_host=ollama_srv.url, tier3_student_name="cc-ws")
        run_id = trained_run.install(s.runs_dir, model_version=7)
        res = export_run(s, run_id)

    # --- the merged model and both GGUF files --------------------------------------------------------------
    merged = load_file(str(res.merged_dir / "model.safetensors"))
    config = json.loads((res.merged_dir / "config.json").read_text())
    assert set(res.files) == {"f16", "q8_0"}
    for info in res.files.values():
        p = Path(info["path"])
        assert info["size_bytes"] == p.stat().st_size
        assert info["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()

    reader = GGUFReader(res.files["f16"]["path"])
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected = {}
    for hf_name, tensor in merged.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        expected[gguf_name] = tuple(tensor.shape)
    got = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # GGUF lists ne, reversed
    assert got == expected  # same names (mapped) and shapes, nothing missing, nothing extra

    def field(r: GGUFReader, key: str) -> object:
        f = r.get_field(key)
        assert f is not None, key
        return f.contents()

    assert field(reader, "general.architecture") == "llama"
    assert len(field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]  # type: ignore[arg-type]
    assert field(reader, "llama.vocab_size") == config["vocab_size"]
    assert field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"  # declared by the tiny model
    # the merged weights themselves went in (f16 rounding only): the embedding, element for element
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = merged["model.embed_tokens.weight"].to(torch.float16)
    assert torch.equal(torch.from_numpy(emb.data.copy()).reshape(ref.shape), ref)
    q8 = GGUFReader(res.files["q8_0"]["path"])
    assert {t.name for t in q8.tensors} == set(expected)
    assert res.gguf == {"architecture": "llama", "n_tensors": len(expected), "vocab_size": config["vocab_size"]}

    # --- Ollama: the blob upload and both creates carry the q8_0 file's digest -------------------------------
    digest = "sha256:" + res.files["q8_0"]["sha256"]
    uploads = [r for r in ollama_srv.requests if r.method == "POST" and r.path.startswith("/api/blobs/")]
    assert [u.path for u in uploads] == [f"/api/blobs/{digest}"]
    assert uploads[0].body_size == res.files["q8_0"]["size_bytes"]
    creates = [r.json for r in ollama_srv.requests if r.path == "/api/create"]
    assert [c["model"] for c in creates] == ["cc-ws:v7", "cc-ws:latest"]
    gguf_name = Path(res.files["q8_0"]["path"]).name
    for c in creates:
        assert c["files"] == {gguf_name: digest}
        assert c["template"] == CHATML_OLLAMA_TEMPLATE
        assert c["parameters"]["stop"] == ["<|im_end|>"]
    assert set(ollama_srv.models) == {"cc-ws:v7", "cc-ws:latest"}
    assert res.ollama.registered and res.ollama.tags == ["cc-ws:v7", "cc-ws:latest"]

    # --- the exported event on training-runs ------------------------------------------------------------------
    events = [decode(m.value() or b"", TrainingRun) for m in consume_values(s, s.training_runs_topic, expected=1)]
    ev = next(e for e in events if e.event == "exported")
    assert ev.run_id == run_id and ev.model_version == 7
    assert ev.details["files"]["q8_0"]["sha256"] == res.files["q8_0"]["sha256"]
    assert ev.details["ollama"]["files"] == {gguf_name: digest}


def test_without_ollama_a_modelfile_and_the_command(tmp_path: Path) -> None:
    gguf_file = tmp_path / "m-v3-q8_0.gguf"
    gguf_file.write_bytes(b"GGUF fake")
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>..."}))
    s = CloseLoopSettings(tier3_ollama_host="http://127.0.0.1:9", tier3_student_name="m")  # nothing listens
    reg = register_with_ollama(s, gguf_file, 3, model_dir)
    assert not reg.registered
    modelfile = Path(reg.modelfile)
    text = modelfile.read_text()
    assert text.startswith("FROM ./m-v3-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert reg.commands == [f"ollama create m:v3 -f {modelfile}", f"ollama create m:latest -f {modelfile}"]
