"""A tiny Llama-type student built offline: random weights, a byte-level BPE tokenizer trained here.

No model hub is reachable from the test machines, and none may be needed at run time in tests, so the project
builds its own test model: a 2-layer, hidden-64 Llama (~0.2 M parameters) whose tokenizer is trained on the text
of the widget-selector task (system prompt, catalog, instructions, JSON answers). Tests, the demo and the CPU
benchmark train LoRA adapters on it.

Choices, with their reasons:

- ``model_type: llama``, not ``qwen2``: transformers 5 loads ``Qwen2Tokenizer`` for a qwen2 folder, which rebuilds
  the pre-tokenizer and ignores tokenizer.json, so ids would silently change. A llama folder with
  ``tokenizer_class: PreTrainedTokenizerFast`` keeps tokenizer.json as it is (a test checks ids round-trip).
- The pre-tokenizer is exactly Qwen2's (NFC, Qwen2's split regex, byte-level without regex), so llama.cpp's
  GGUF converter can be told it is ``qwen2`` (:data:`GGUF_PRE_TOKENIZER`, also written to tokenizer_config.json
  and config.json as ``tier3_gguf_pre_tokenizer``): a freshly trained tokenizer's hash is unknown to the converter.
- ChatML chat template with ``{% generation %}`` ... ``{% endgeneration %}`` around the assistant content *and* its
  ``<|im_end|>``, so TRL's assistant-only loss trains the student to stop. eos = ``<|im_end|>``.
- The build is deterministic (fixed seed, sorted corpus) and cached: a folder with a matching ``.tier3_tiny``
  stamp is returned as is; a fresh build is written to a temp folder and moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from schemas.tasks import ANSWER_ONLY_INSTRUCTION, REASONED_INSTRUCTION, get_task

#: bump when anything below changes what is built (the stamp then no longer matches and the cache rebuilds)
RECIPE_VERSION = 2

TASK_NAME = "widget_selector"
EOT_TOKEN = "<|im_end|>"  # end of turn == eos: the token the student must learn to emit
BOT_TOKEN = "<|im_start|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOT_TOKEN, EOT_TOKEN)  # ids 0, 1, 2

#: llama.cpp's name for this pre-tokenizer (convert_hf_to_gguf.py ``--`` ``tokenizer.ggml.pre``)
GGUF_PRE_TOKENIZER = "qwen2"
#: Qwen2's split regex, verbatim from its tokenizer.json (digits one by one)
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

VOCAB_SIZE = 1024
HIDDEN_SIZE = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
INTERMEDIATE_SIZE = 176
MAX_POSITIONS = 4096
SEED = 1234
# The LM head (untied from the input embeddings) is drawn with this std instead of initializer_range (0.02): a
# logit is (RMS-normed hidden, |h| ~ sqrt(64) = 8) . (head row), and LoRA trains neither the norm nor the head, so
# with 0.02 (|row| ~ 0.16) no logit can exceed ~1.3 and the student stays near uniform whatever it is taught.
# With 0.25 a logit can reach ~16 while the initial predictions stay diffuse (logit std ~2). Untied, because a
# tied head that large makes the random model predict its input token again with high confidence.
LM_HEAD_STD = 0.25

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: SFT settings under which the tiny student visibly learns the task on CPU (100 traces: ~30 s on 2 cores; it
#: stops at its end-of-turn token and some answers parse). The defaults (lr 3e-3, batch 8, answer:6) suit the
#: real 135M student; on this random 0.2 M-parameter model they barely move the loss.
TINY_DEMO_OVERRIDES: dict[str, object] = {"tier3_learning_rate": 1e-2, "tier3_phases": "answer:5,reasoning:5",
                                          "tier3_batch_size": 4}

_GENERATION_TAG_RE = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")

_STAMP = ".tier3_tiny"

# A few questions and reasoning sentences so common English in user turns does not fall back to single bytes.
_SAMPLE_QUESTIONS = (
    "Why is checkout slow since yesterday's deploy?",
    "How much revenue did we make this quarter compared to last quarter?",
    "Which services are throwing errors right now?",
    "Are we meeting our uptime SLA this month?",
    "Show me memory and CPU for the API hosts over the last hour.",
    "How many users signed up and converted this week?",
    "Which customers spend the most, and is churn going up?",
    "Is the Kafka consumer lag growing on the orders queue?",
    "What did the cloud bill cost per team over the last 90 days?",
    "Are we running low on stock for any SKU, and are orders shipping late?",
    "How many support tickets are open and how long do they take to resolve?",
    "Give me a quick overview of today's key numbers.",
)
_SAMPLE_REASONING = (
    "The user asks about latency after a deploy, so latency percentiles and the incident timeline matter most. "
    "The question is about the recent past, so a short time range fits.",
    "Revenue compared across quarters needs the revenue trend over a long range, with headline KPI tiles.",
    "Errors happening now call for the error rate, active alerts and logs over the last hour.",
)


def plain_chat_template(template: str) -> str:
    """The chat template without ``{% generation %}`` markers (for GGUF / Ollama, whose Jinja lacks them)."""
    return _GENERATION_TAG_RE.sub("", template)


def _corpus() -> list[str]:
    """Deterministic training text for the tokenizer: what the student reads and writes in this task."""
    task = get_task(TASK_NAME)
    widgets = sorted(task.catalog)
    ranges = ["1h", "24h", "7d", "30d", "90d"]
    texts = [task.system_prompt, REASONED_INSTRUCTION, ANSWER_ONLY_INSTRUCTION, *_SAMPLE_QUESTIONS,
             *_SAMPLE_REASONING]
    texts += [f"{k}: {v}" for k, v in sorted(task.catalog.items())]
    for i, w in enumerate(widgets):
        for j, r in enumerate(ranges):
            others = [widgets[(i + j + 1) % len(widgets)], widgets[(i * 3 + j + 5) % len(widgets)]]
            picked = [w, *others][: 1 + (i + j) % 3]
            body = json.dumps({"time_range": r, "widgets": list(dict.fromkeys(picked))}, sort_keys=True,
                              separators=(",", ":"))
            texts.append(f"<answer>\n{body}\n</answer>")
            texts.append(f"<reasoning>\n{_SAMPLE_REASONING[(i + j) % len(_SAMPLE_REASONING)]}\n</reasoning>\n"
                         f"<answer>\n{body}\n</answer>")
    # every role header the chat template writes, so they are single tokens after the special token
    texts += [f"{role}\n" for role in ("system", "user", "assistant")]
    return texts


def _train_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)  # type: ignore[call-arg]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown token
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _recipe_hash() -> str:
    """What the folder depends on: this file (every constant and step of the recipe) and the task text the
    tokenizer learns from."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([RECIPE_VERSION, VOCAB_SIZE, HIDDEN_SIZE, N_LAYERS, N_HEADS, N_KV_HEADS, INTERMEDIATE_SIZE,
                         MAX_POSITIONS, SEED, LM_HEAD_STD, CHAT_TEMPLATE, QWEN2_SPLIT_REGEX, _corpus()]).encode())
    return h.hexdigest()[:16]


def _is_built(folder: Path, recipe: str) -> bool:
    try:
        return (folder / _STAMP).read_text().strip() == recipe
    except OSError:
        return False


def build_tiny_model(out_dir: Path) -> Path:
    """Build the tiny student into ``out_dir`` (or return it at once if it is already built); return the folder."""
    out_dir = Path(out_dir).resolve()
    recipe = _recipe_hash()
    if _is_built(out_dir, recipe):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir.parent / f".{out_dir.name}.lock"):  # parallel test processes build one copy, not a torn one
        if _is_built(out_dir, recipe):  # another process built it while we waited
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _write_model(tmp, recipe)
            if out_dir.exists():  # an old recipe or a torn folder: make room (rename is atomic, rmtree is not)
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                os.replace(out_dir, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_tiny_model_dir() -> Path:
    """A per-user cache folder for the tiny model (``$TIER3_TINY_MODEL_DIR`` overrides it)."""
    env = os.environ.get("TIER3_TINY_MODEL_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tier3" / f"tiny-llama-{_recipe_hash()}"


def cached_tiny_model() -> Path:
    """Build (once per machine) and return the tiny model in :func:`default_tiny_model_dir`."""
    return build_tiny_model(default_tiny_model_dir())


def _write_model(folder: Path, recipe: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOT_TOKEN, pad_token=PAD_TOKEN, bos_token=None, unk_token=None,
        model_max_length=MAX_POSITIONS, padding_side="right", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}

    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        head_dim=HIDDEN_SIZE // N_HEADS, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        initializer_range=0.02, hidden_act="silu",
        bos_token_id=None, eos_token_id=ids[EOT_TOKEN], pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(SEED)  # random but reproducible weights
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, LM_HEAD_STD)
    model.generation_config.eos_token_id = ids[EOT_TOKEN]
    model.generation_config.pad_token_id = ids[PAD_TOKEN]
    model.generation_config.bos_token_id = None  # no BOS: the chat template starts every prompt
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    # Pin the tokenizer class (transformers would otherwise pick one from model_type) and declare the GGUF
    # pre-tokenizer name for the export step.
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
               "chat_template": CHAT_TEMPLATE, "tier3_gguf_pre_tokenizer": GGUF_PRE_TOKENIZER})
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tier3_gguf_pre_tokenizer"] = GGUF_PRE_TOKENIZER
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "chat_template.plain.jinja").write_text(plain_chat_template(CHAT_TEMPLATE))
    (folder / _STAMP).write_text(recipe + "\n")
    for p in folder.iterdir():  # durable before the rename that publishes the folder
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
