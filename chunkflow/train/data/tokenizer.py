"""Tokenizers for training data, and chat records turned into input ids and labels.

Two tokenizers share one small interface (``vocab_size``, ``eos_token_id``, ``name``,
``encode(text)`` for rendered chats, ``encode_document(text)`` for text records (with the
tokenizer's own special tokens, such as a BOS), ``render_chat(messages,
add_generation_prompt=...)``):

- ``ByteTokenizer``: UTF-8 bytes, 256 ids, no special tokens, and a plain-text chat template
  (``<|user|>\\n...\\n``, ``<|assistant|>\\n...<|end|>\\n``). Needs nothing installed to
  train; ``save_pretrained`` writes it as a Hugging Face tokenizer that encodes the same ids
  and carries the same chat template, so checkpoints of byte-level runs are self-contained.
- ``HFTokenizer``: a local Hugging Face tokenizer directory, loaded with ``local_files_only``
  (never the network); its own ``chat_template`` renders messages.

``encode_chat`` labels assistant turns by the prefix-difference method, so it works with any chat
template: the tokens of ``render(messages[:i], add_generation_prompt=True)`` are a prefix of the
tokens of ``render(messages[:i + 1])``, and the tokens in between are assistant turn i (its content
and whatever the template closes the turn with, e.g. ``<|im_end|>\\n``). Invariants: ids and labels
have the same length; a label is either the id at its position or -100. A template with
``{% generation %}`` markers is labelled by them (transformers' assistant mask); one that is
not prefix-stable (it renders the last assistant turn differently) by where each assistant
content lies in the whole rendering; one that defeats both raises ``ChatTemplateError``
instead of mislabelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

IGNORE_INDEX = -100
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_VALID_SPEC = ("valid: --data.tokenizer=byte, or a local directory holding a Hugging Face "
               "tokenizer (tokenizer.json and/or tokenizer_config.json)")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    name: str

    def encode(self, text: str) -> list[int]: ...

    def encode_document(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool,
                    tools: list | None = None) -> str: ...

    def save_pretrained(self, path: str | Path) -> None: ...


class ChatTemplateError(ValueError):
    """The tokenizer cannot label chat records (no template, or one that is not prefix-stable).

    A property of the tokenizer, not of one record, so ``--data.skip_invalid`` does not skip it.
    """


# ByteTokenizer.render_chat as a Jinja chat template, for the saved Hugging Face tokenizer.
# ByteTokenizer.render_chat as a Jinja chat template, for the saved Hugging Face tokenizer.
# Newlines are expressions: transformers renders with trim_blocks, which eats a literal newline
# after a block tag.
_BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|end|>\\n' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE works on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; no EOS token."""

    vocab_size = 256
    eos_token_id = None
    name = "byte"

    def save_pretrained(self, path: str | Path) -> None:
        """Write this tokenizer as a Hugging Face fast tokenizer (byte-level BPE without merges,
        id = byte value) with the same chat template."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {char: b for b, char in _bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=_BYTE_CHAT_TEMPLATE,
                                clean_up_tokenization_spaces=False).save_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_document(self, text: str) -> list[int]:
        return self.encode(text)  # no special tokens

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool,
                    tools: list | None = None) -> str:
        if tools or any(m.get("tool_calls") for m in messages):
            raise ValueError("tool calls and a 'tools' list need the chat template of the "
                             "model's tokenizer; valid: --data.tokenizer=auto with --model.path "
                             "(or a tokenizer directory), or chats without tools")
        # The end marker closes assistant turns only: it is what the model learns to emit to stop.
        parts = [f"<|{m['role']}|>\n{m['content']}" +
                 ("<|end|>\n" if m["role"] == "assistant" else "\n") for m in messages]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)


class HFTokenizer:
    """A local Hugging Face tokenizer directory (``AutoTokenizer``, no network)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # slow import: only when asked for

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
            raise ValueError(f"--data.tokenizer={path!r}: cannot load a tokenizer from this "
                             f"directory ({type(e).__name__}: {e}); {_VALID_SPEC}") from e
        self.name = path
        self.vocab_size = len(self._tok)  # includes added special tokens, unlike tok.vocab_size
        self.eos_token_id = self._tok.eos_token_id

    def save_pretrained(self, path: str | Path) -> None:
        """The tokenizer files (with its chat template), as transformers writes them."""
        self._tok.save_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS here: the chat template writes its own special tokens into the text (as
        # apply_chat_template(tokenize=True) encodes it).
        return self._tok.encode(text, add_special_tokens=False)

    def encode_document(self, text: str) -> list[int]:
        """A text record as ``tokenizer(text)`` encodes it: with the special tokens the
        tokenizer's post-processor adds (a Llama-style ``<bos>``; none for Qwen's). EOS comes
        from the data layer (--data.add_eos) unless the post-processor already ends with it."""
        return self._tok(text, add_special_tokens=True)["input_ids"]

    @property
    def eos_text(self) -> str | None:
        return self._tok.eos_token

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool,
                    tools: list | None = None) -> str:
        self._check_template()
        try:
            return self._tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
            raise ValueError(f"the chat template of {self.name!r} rejected the messages "
                             f"({type(e).__name__}: {e})") from e

    @property
    def marks_generation(self) -> bool:
        """The template marks assistant tokens ({% generation %}), so transformers' assistant
        mask labels them exactly."""
        template = getattr(self._tok, "chat_template", None)
        return isinstance(template, str) and "{% generation %}" in template.replace(
            "{%- generation", "{% generation").replace("generation -%}", "generation %}")

    def assistant_mask(self, messages: list[dict], tools: list | None = None
                       ) -> tuple[list[int], list[int]]:
        """(ids, 1 for each assistant token) by the template's generation markers."""
        try:
            out = self._tok.apply_chat_template(messages, tools=tools or None, tokenize=True,
                                                return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as e:
            raise ValueError(f"the chat template of {self.name!r} rejected the messages "
                             f"({type(e).__name__}: {e})") from e
        return list(out["input_ids"]), list(out["assistant_masks"])

    def _check_template(self) -> None:
        if not getattr(self._tok, "chat_template", None):
            raise ChatTemplateError(
                f"--data.tokenizer={self.name!r} has no chat_template, so chat records cannot be "
                f"rendered; valid: a tokenizer whose tokenizer_config.json (or "
                f"chat_template.jinja) defines one, --data.tokenizer=byte, or text records")


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> ByteTokenizer; a local tokenizer directory -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--data.tokenizer={spec!r}: no such directory; {_VALID_SPEC}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"--data.tokenizer={spec!r}: directory has neither "
                         f"{' nor '.join(_TOKENIZER_FILES)}; {_VALID_SPEC}")
    return HFTokenizer(spec)


def check_messages(messages: Any) -> None:
    """ValueError unless ``messages`` is a non-empty list of {role: str, content: str} dicts;
    an assistant turn that calls tools (``tool_calls``, a non-empty list) may have a null
    content (OpenAI's format)."""
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if messages == [] else type(messages).__name__
        raise ValueError(f"messages must be a non-empty list of {{role, content}} objects, "
                         f"got {what}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be an object with role and content, got "
                             f"{type(m).__name__}")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and calls):
            raise ValueError(f"message {i}: 'tool_calls' must be a non-empty array, got "
                             f"{calls!r}")
        for key in ("role", "content"):
            if key == "content" and m.get(key) is None and calls:
                continue  # a tool call without text
            if not isinstance(m.get(key), str):
                got = ("missing" if key not in m else "null" if m[key] is None
                       else type(m[key]).__name__)
                raise ValueError(f"message {i}: {key!r} must be a string, got {got}")


def text_content(messages: list) -> list:
    """Messages whose ``content`` is a list of parts (OpenAI's format) with the parts' text
    joined, as a template that takes strings renders them; a part that is not text is refused
    (chunkflow trains text models)."""
    out = []
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        if isinstance(parts, list):
            texts = []
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    what = repr(kind) if kind is not None else type(part).__name__
                    raise ValueError(f"message {i}: content part {j} is {what}, not text; valid: "
                                     f"{{\"type\": \"text\", \"text\": ...}} parts (a text "
                                     f"model trains on text only)")
                texts.append(part["text"])
            m = dict(m, content="".join(texts))
        out.append(m)
    return out


def encode_chat(tokenizer: Tokenizer, messages: list[dict], *, train_on: str,
                tools: list | None = None) -> tuple[list[int], list[int]]:
    """Input ids and labels (-100 = not supervised) for a conversation (``tools``: the
    record's tool definitions, passed to the template as transformers does).

    ``train_on="assistant"`` supervises the assistant turns (content, tool calls and the
    template's end of turn); ``"all"`` every token. The assistant tokens come from the
    template's ``{% generation %}`` markers where it has them; else from the prefix
    difference (module docstring); else, for a template that renders the last assistant turn
    differently (Qwen3's empty think block), from where each assistant turn's content lies in
    the whole rendering through its end-of-turn token (:func:`_marked_spans`).
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on={train_on!r}; valid: 'assistant', 'all'")
    check_messages(messages)

    def render(msgs, add_generation_prompt):
        return tokenizer.render_chat(msgs, add_generation_prompt=add_generation_prompt,
                                     **({"tools": tools} if tools else {}))

    full_text = render(messages, False)
    ids = tokenizer.encode(full_text)
    if train_on == "all":
        return ids, list(ids)
    if getattr(tokenizer, "marks_generation", False):
        marked_ids, mask = tokenizer.assistant_mask(messages, tools)
        if marked_ids == ids and any(mask):
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]

    # Character spans [start, end) of each assistant turn, checked to be prefix-stable as text.
    spans, unstable_at = [], None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[:i + 1], False)
        if not (through.startswith(before) and full_text.startswith(through)
                and len(through) > len(before)):
            unstable_at = i
            break
        spans.append((len(before), len(through)))
    stable = unstable_at is None
    if not stable:
        spans = _marked_spans(tokenizer, messages, full_text, render, unstable_at)
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return ids, labels

    # Fast path, linear in the conversation: when encoding the text piece by piece gives the same
    # tokens as encoding it whole, every span boundary is a token boundary.
    cuts = sorted({0, len(full_text), *(c for span in spans for c in span)})
    pieces = [tokenizer.encode(full_text[a:b]) for a, b in zip(cuts, cuts[1:])]
    if [t for piece in pieces for t in piece] == ids:
        start_of = {}
        pos = 0
        for cut, piece in zip(cuts, pieces):
            start_of[cut] = pos
            pos += len(piece)
        start_of[len(full_text)] = pos
        for a, b in spans:
            labels[start_of[a]:start_of[b]] = ids[start_of[a]:start_of[b]]
        return ids, labels
    if not stable:
        raise _not_prefix_stable(tokenizer, unstable_at, "tokens")

    # General path (e.g. tokenizers that add a prefix space to every encode call): the tokens of
    # each prefix rendering must be a prefix of the whole; quadratic in the number of turns.
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.encode(render(messages[:i], True))
        through = tokenizer.encode(render(messages[:i + 1], False))
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise _not_prefix_stable(tokenizer, i, "tokens")
        labels[len(before):len(through)] = through[len(before):]
    return ids, labels


_MARK = "\ue000chunkflow-{}-{}\ue000"  # private-use characters: no template or text has them


def _marked_spans(tokenizer, messages: list[dict], full_text: str, render, unstable_at: int
                  ) -> list[tuple[int, int]]:
    """Assistant spans of the whole rendering, for a template that is not prefix-stable: each
    assistant content is rendered between two marks, the marks are found and removed (the rest
    must be ``full_text`` exactly), and a turn runs from its content's start through the first
    end-of-turn token (the tokenizer's EOS) after it, tool calls included."""
    eos = getattr(tokenizer, "eos_text", None)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not eos:
        raise _not_prefix_stable(tokenizer, unstable_at, "rendered text")
    marked = [dict(m, content=_MARK.format(i, "s") + (m.get("content") or "")
                   + _MARK.format(i, "e")) if m["role"] == "assistant" else m
              for i, m in enumerate(messages)]
    text = render(marked, False)
    found = []
    for i in turns:
        for side in "se":
            mark = _MARK.format(i, side)
            if text.count(mark) != 1:  # the template dropped or repeated the content
                raise _not_prefix_stable(tokenizer, i, "rendered text")
            found.append((text.index(mark), len(mark), i, side))
    found.sort()
    clean, pos, at = [], 0, {}
    for start, length, i, side in found:
        clean.append(text[pos:start])
        at[i, side] = sum(map(len, clean))
        pos = start + length
    clean.append(text[pos:])
    if "".join(clean) != full_text or any(at[i, "s"] > at[i, "e"] for i in turns):
        raise _not_prefix_stable(tokenizer, unstable_at, "rendered text")
    spans = []
    for n, i in enumerate(turns):
        limit = at[turns[n + 1], "s"] if n + 1 < len(turns) else len(full_text)
        end = full_text.find(eos, at[i, "e"], limit)
        if end < 0:
            raise _not_prefix_stable(tokenizer, i, "rendered text")
        spans.append((at[i, "s"], end + len(eos)))
    return spans


def _not_prefix_stable(tokenizer: Tokenizer, turn: int, what: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"the chat template of tokenizer {tokenizer.name!r} is not prefix-stable at assistant "
        f"message {turn}: the {what} of the conversation before it (with the generation prompt) "
        f"are not a prefix of the {what} through it, so its tokens cannot be labelled reliably; "
        f"valid: a template that renders earlier turns the same whatever follows them, "
        f"--data.train_on=all, or pre-tokenised input_ids/labels records")
