"""llama.cpp's GGUF converter as tier3 uses it: fetched once, run in its own process.

- **Fetch** (:func:`ensure_converter`): ``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/`` is taken
  from the llama-cpp-python *source* distribution on PyPI (``vendor/llama.cpp``): ``pip download --no-deps
  --no-binary :all:`` once, only those files extracted into a per-user cache (``~/.cache/tier3/tools``,
  ``XDG_CACHE_HOME``), never built. ``make setup`` fetches it at install time (``python -m
  trainer.close_loop.gguf_converter fetch``, internal), so an export needs no network.
- **Run** (:func:`convert_to_gguf`): ``python -m trainer.close_loop.gguf_converter run CONVERTER_DIR PRE ARGS...``
  (internal), a process of its own because the converter's ``gguf-py`` must come first on ``sys.path`` (PyPI's
  ``gguf`` package is too old for it) and because of one change, made by a named function before the converter
  runs: :func:`use_declared_pre_tokenizer`. A tokenizer trained locally has a pre-tokenizer hash the converter
  does not know; the model may declare a known name (``tier3_gguf_pre_tokenizer`` in its tokenizer_config.json /
  config.json, or ``TIER3_GGUF_PRE_TOKENIZER``: :func:`declared_pre_tokenizer`), used only when the converter's
  own detection fails.

This module imports only the standard library (and ``trainer.errors``) at its top: the converter's process loads
nothing else of ours before the converter.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import ExportError

if TYPE_CHECKING:
    from trainer.close_loop.settings import CloseLoopSettings

PRE_TOKENIZER_KEY = "tier3_gguf_pre_tokenizer"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
_VENDOR = "vendor/llama.cpp/"
_CONVERTER_PARTS = (CONVERTER_SCRIPT, "conversion/", "gguf-py/")
CONVERT_TIMEOUT_S = 3600.0  # a 7B model takes minutes; a hung converter must not hang the trainer forever


def default_tools_dir() -> Path:
    """A per-user cache shared by every data dir and test (the converter is ~2 MB, its sdist ~75 MB)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tier3" / "tools"


def ensure_converter(settings: CloseLoopSettings) -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (fetched and extracted once)."""
    if settings.tier3_llama_cpp_dir is not None:
        d = Path(settings.tier3_llama_cpp_dir)
        if not (d / CONVERTER_SCRIPT).is_file():
            raise ExportError(f"TIER3_LLAMA_CPP_DIR={d} has no {CONVERTER_SCRIPT}")
        return d
    version = settings.tier3_llama_cpp_python_version
    tools = default_tools_dir()
    target = tools / f"llama.cpp-converter-{version}"
    if (target / CONVERTER_SCRIPT).is_file():
        return target
    tools.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # concurrent exports / test workers fetch the converter once
    with FileLock(tools / f".llama.cpp-converter-{version}.lock"):
        if (target / CONVERTER_SCRIPT).is_file():
            return target
        with tempfile.TemporaryDirectory(dir=tools, prefix=".fetch-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if proc.returncode != 0 or not sdists:
                raise ExportError(f"could not download the llama-cpp-python {version} source distribution "
                                  f"(it carries llama.cpp's GGUF converter): {proc.stderr.strip()[-800:]}; "
                                  "fetch it once while online (`python -m trainer.close_loop.gguf_converter fetch`, "
                                  "which `make setup` runs) or set TIER3_LLAMA_CPP_DIR to a llama.cpp checkout",
                                  retryable=True)
            staging = Path(tmp) / "converter"
            with tarfile.open(sdists[0]) as tar:
                members = []
                for m in tar.getmembers():
                    _, _, rel = m.name.partition(_VENDOR)
                    if rel and (m.isfile() or m.isdir()) and rel.startswith(_CONVERTER_PARTS):
                        m.name = rel
                        members.append(m)
                tar.extractall(staging, members=members, filter="data")
            if not (staging / CONVERTER_SCRIPT).is_file():
                raise ExportError(f"{sdists[0].name} has no {_VENDOR}{CONVERTER_SCRIPT}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)  # atomic: a half-extracted converter is never used
    return target


def declared_pre_tokenizer(override: str | None, *dirs: Path) -> str:
    """The setting when given, else ``tier3_gguf_pre_tokenizer`` from the first model folder declaring it."""
    if override:
        return override
    for d in dirs:
        for name in ("tokenizer_config.json", "config.json"):
            p = d / name
            if p.is_file():
                with contextlib.suppress(ValueError, OSError):
                    value = json.loads(p.read_text()).get(PRE_TOKENIZER_KEY)
                    if value:
                        return str(value)
    return ""


def convert_to_gguf(model_dir: Path, outfile: Path, outtype: str, converter_dir: Path, *,
                    pre_tokenizer: str = "", model_name: str | None = None, vocab_only: bool = False) -> Path:
    """Run llama.cpp's converter on a Hugging Face model folder; write ``outfile`` atomically (``vocab_only``:
    the tokenizer alone, no weights)."""
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(f".{outfile.name}.tmp")
    cmd = [sys.executable, "-m", "trainer.close_loop.gguf_converter", "run", str(converter_dir), pre_tokenizer,
           str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    if model_name:
        cmd += ["--model-name", model_name]
    if vocab_only:
        cmd.append("--vocab-only")
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # we put gguf-py on the path ourselves, first
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"GGUF conversion ({outtype}) took longer than {CONVERT_TIMEOUT_S:.0f} s",
                          retryable=True) from None
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"GGUF conversion ({outtype}) of {model_dir} failed: {proc.stderr.strip()[-1500:]}")
    os.replace(tmp, outfile)
    return outfile


def use_declared_pre_tokenizer(conversion_base: Any, pre: str) -> None:
    """In the converter's process: when its pre-tokenizer detection fails (``NotImplementedError``: a tokenizer hash
    it does not know), use ``pre`` instead (none given: the failure stands). ``conversion_base`` is the
    converter's own ``conversion.base`` module."""
    detect = conversion_base.TextModel.get_vocab_base_pre

    def declared(self: Any, tokenizer: Any) -> Any:
        try:
            return detect(self, tokenizer)
        except NotImplementedError:
            if not pre:
                raise
            print(f"tier3: tokenizer hash unknown to the converter; using the declared pre-tokenizer {pre!r}",
                  file=sys.stderr)
            return pre

    conversion_base.TextModel.get_vocab_base_pre = declared


def run_converter(converter_dir: str, pre: str, args: Sequence[str]) -> None:
    """Run ``convert_hf_to_gguf.py`` of ``converter_dir`` in this process with ``args`` (its own command line),
    its ``gguf-py`` first on the path and the declared pre-tokenizer as the fallback."""
    script = str(Path(converter_dir) / CONVERTER_SCRIPT)
    sys.argv = [script, *args]
    sys.path[:0] = [str(Path(converter_dir) / "gguf-py"), converter_dir]
    import conversion.base  # type: ignore[import-not-found]  # the converter's, from converter_dir

    use_declared_pre_tokenizer(conversion.base, pre)
    runpy.run_path(script, run_name="__main__")


def main(argv: Sequence[str] | None = None) -> int:
    """Internal: ``fetch`` (install time: the converter into the cache now, while online; prints its folder) or
    ``run CONVERTER_DIR PRE ARGS...`` (started by :func:`convert_to_gguf`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fetch"] and len(args) == 1:
        from trainer.close_loop.settings import CloseLoopSettings

        try:
            print(ensure_converter(CloseLoopSettings()))
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args[:1] == ["run"] and len(args) >= 3:
        run_converter(args[1], args[2], args[3:])
        return 0
    print("usage: python -m trainer.close_loop.gguf_converter fetch | run CONVERTER_DIR PRE ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
