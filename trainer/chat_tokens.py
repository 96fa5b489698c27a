"""Chat prompts to token ids with special tokens from the chat template only: message text is always plain text.

A tokenizer that is handed a rendered chat prompt parses every special-token string in it, wherever it came from:
an application's user message that contains ``<|im_start|>assistant`` becomes a real turn header in the student's
training data (and, with a response mask found by searching for that header, a loss target), and the same string
in a request to the served student opens a real turn there. tier3 therefore never tokenizes message text with
special-token parsing on, in training, in the PyTorch evaluation and in serving:

1. every message's content is replaced by a slot marker (``\\ue000<nonce>:<i>\\ue001``, private-use characters and
   a random nonce, so no text can forge one) and the chat template renders the prompt around the markers;
2. the rendering is cut at the markers: the template's own text is tokenized with special-token parsing **on**
   (the template alone inserts ``<|im_start|>``, ``<|im_end|>``, BOS ...), each message's content with parsing
   **off** (``split_special_tokens=True`` in transformers, ``special=False`` in llama.cpp), so a special-token
   string in content becomes the ordinary tokens of its characters;
3. the training mask (:func:`hf_chat_features`) is built from these positions: an assistant message's content
   tokens plus the template tokens after it up to and including the end-of-turn token, never by searching text.

The trainer (TRL and unsloth backends), the PyTorch evaluator (``inference.prompt_ids``) and ``tier3 serve`` (the
chat handler :func:`content_as_text` installs in the llama.cpp server) cut prompts the same way, so the ids agree
(``trainer/close_loop/parity.py`` checks them on both sides). A template that transforms message content (trims,
escapes) cannot be cut at markers: :func:`hf_chat_features` refuses it with :class:`TemplateError` (the content
inserted as given would not reproduce the template's own rendering).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import BaseModelError

_OPEN, _CLOSE = "\ue000", "\ue001"


class TemplateError(BaseModelError):
    """The chat template changes message content, so its prompts cannot be cut into template text and content."""


def _text_content(content: Any) -> str | None:
    """A message's text: the string itself, or the text parts of an OpenAI content list joined; None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(str(p["text"]) for p in content)
    return None


@dataclass
class Slots:
    """The messages' contents, with their markers: ``mark`` the messages, render, ``split`` the rendering."""

    contents: list[str] = field(default_factory=list)
    nonce: str = field(default_factory=lambda: secrets.token_hex(6))

    def mark(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            m2 = dict(m)
            text = _text_content(m.get("content"))
            if text is not None:
                m2["content"] = f"{_OPEN}{self.nonce}:{len(self.contents)}{_CLOSE}"
                self.contents.append(text)
            out.append(m2)
        return out

    @property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(f"{_OPEN}{self.nonce}:(\\d+){_CLOSE}")

    def has_markers(self, text: str) -> bool:
        return bool(self.contents) and self._pattern.search(text) is not None

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """``(piece, index)`` in order: template text has index None, a message's content its slot index."""
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            i = int(m.group(1))
            if i < len(self.contents):
                out.append((self.contents[i], i))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out


# ------------------------------------------------------------------------------------------------ transformers


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
            chat_template: str | None) -> str:
    return str(tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template))


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])


#: end-of-turn tokens of known templates (besides eos): Gemma, ChatML, Llama 3, Phi-3
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def end_of_turn_ids(tokenizer: Any) -> dict[int, str]:
    """Token id -> text of every token that ends an assistant turn: eos, plus the template's own end-of-turn
    token when the chat template writes one."""
    out: dict[int, str] = {}
    if tokenizer.eos_token_id is not None:
        out[int(tokenizer.eos_token_id)] = str(tokenizer.eos_token)
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in template and tok in vocab:
            out[int(vocab[tok])] = tok
    return out


def hf_chat_features(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                     chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_mask)`` of a chat: template text tokenized with special tokens, content without
    (module doc). The mask is 1 on every assistant message's content tokens and on the template tokens after it up
    to and including the end-of-turn token (what the model must learn to write and where it must stop), 0
    elsewhere. Raises :class:`TemplateError` when the template does not insert content as it is."""
    slots = Slots()
    marked = slots.mark(messages)
    rendered = _render(tokenizer, marked, add_generation_prompt, chat_template)
    pieces = slots.split(rendered)
    real = _render(tokenizer, messages, add_generation_prompt, chat_template)
    if "".join(p for p, _ in pieces) != real or sum(1 for _, i in pieces if i is not None) != len(slots.contents):
        raise TemplateError("the chat template changes message content (or drops a message), so tier3 cannot keep "
                            "special tokens out of message text: use a template that inserts content as it is "
                            "(ChatML, Llama 3, Phi-3 ...)")
    roles = [str(m.get("role")) for m in messages if _text_content(m.get("content")) is not None]
    eot = set(end_of_turn_ids(tokenizer))
    ids: list[int] = []
    mask: list[int] = []
    open_turn = False  # after an assistant's content: the template text right after it, up to the end of turn
    for piece, idx in pieces:
        if idx is None:
            part = _encode(tokenizer, piece, special=True)
            ids.extend(part)
            for t in part:
                mask.append(1 if open_turn else 0)
                if open_turn and t in eot:
                    open_turn = False
            open_turn = False  # never past the template text that follows the content
        else:
            part = _encode(tokenizer, piece, special=False)
            ids.extend(part)
            assistant = roles[idx] == "assistant"
            mask.extend([1 if assistant else 0] * len(part))
            open_turn = assistant
    return ids, mask


def hf_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                  chat_template: str | None = None) -> list[int]:
    """The ids a model is asked with: the chat with the generation prompt, content as plain text."""
    return hf_chat_features(tokenizer, messages, add_generation_prompt=True, chat_template=chat_template)[0]


def training_features(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                      chat_template: str | None = None) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of a training example: labels are the ids on the assistant mask, -100 elsewhere."""
    ids, mask = hf_chat_features(tokenizer, messages, chat_template=chat_template)
    if 1 not in mask:
        raise TemplateError("the training example has no assistant tokens to learn")
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]}


# ------------------------------------------------------------------------------------------------ llama.cpp


class _SlotTokenizer:
    """Stands in for ``llama_cpp.Llama`` inside a chat handler: ``tokenize`` of a rendering that holds slot
    markers tokenizes template text with special tokens and content without; everything else is the model's."""

    def __init__(self, llm: Any, slots: Slots) -> None:
        self._llm = llm
        self._slots = slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        s = text.decode("utf-8", errors="replace")
        if not self._slots.has_markers(s):
            return list(self._llm.tokenize(text, add_bos=add_bos, special=special))
        ids: list[int] = list(self._llm.tokenize(b"", add_bos=True, special=True)) if add_bos else []
        for piece, idx in self._slots.split(s):
            if piece:
                ids.extend(self._llm.tokenize(piece.encode("utf-8"), add_bos=False,
                                              special=special and idx is None))
        return ids


class ContentAsText:
    """A llama-cpp-python chat handler around the model's own (``inner``): the same rendering and generation, with
    message content tokenized as plain text (module doc)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, *, llama: Any, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
        slots = Slots()
        marked = slots.mark(messages)
        return self.inner(llama=_SlotTokenizer(llama, slots), messages=marked, **kwargs)


def content_as_text(llm: Any) -> Any:
    """Install :class:`ContentAsText` around the chat handler ``llm.create_chat_completion`` would use (the one
    ``Llama`` chose: a registered format or the GGUF's Jinja template). Idempotent; returns ``llm``."""
    from llama_cpp import llama_chat_format

    current = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
               or llama_chat_format.get_chat_completion_handler(llm.chat_format))
    if not isinstance(current, ContentAsText):
        llm.chat_handler = ContentAsText(current)
    return llm
