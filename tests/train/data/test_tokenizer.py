"""Tokenizers and chat labelling: labels must cover exactly the assistant turns.

Expectations are built from the rendered strings by hand (character spans of each assistant turn),
never from encode_chat's own output. The Hugging Face tokenizer is a tiny BPE trained here and
saved to tmp_path: no network.
"""

from __future__ import annotations

import json

import pytest

from chunkflow.train.data.tokenizer import (ByteTokenizer, ChatTemplateError, HFTokenizer, encode_chat,
                                       load_tokenizer)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi, how are you"},
    {"role": "user", "content": "fine, café?"},
    {"role": "assistant", "content": " the assistant says café"},
]


def make_hf_tokenizer(path, *, chat_template: str | None = CHATML) -> str:
    """A tiny byte-level BPE with ChatML special tokens, saved as a local tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there, how are you? the assistant says hi", "fine, thanks",
                             "system user assistant be brief"] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   chat_template=chat_template)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of supervised positions."""
    out, start = [], None
    for i, x in enumerate(labels + [-100]):
        if x != -100 and start is None:
            start = i
        elif x == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


def test_byte_tokenizer_encodes_utf8_and_renders_plain_chat():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_token_id, tok.name) == (256, None, "byte")
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.render_chat(msgs, add_generation_prompt=False) == \
        "<|user|>\nhi\n<|assistant|>\nyo<|end|>\n"
    assert tok.render_chat(msgs[:1], add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"


def test_byte_chat_labels_cover_exactly_the_assistant_turns():
    ids, labels = encode_chat(ByteTokenizer(), CONVERSATION, train_on="assistant")
    text = ("<|system|>\nBe brief.\n<|user|>\nhello there\n"
            "<|assistant|>\nhi, how are you<|end|>\n<|user|>\nfine, café?\n"
            "<|assistant|>\n the assistant says café<|end|>\n")
    assert ids == list(text.encode())
    # Byte spans of "content<|end|>\n" for each assistant turn, found in the expected text.
    expected = []
    for content in ("hi, how are you", " the assistant says café"):
        start = text.index(f"<|assistant|>\n{content}") + len("<|assistant|>\n")
        end = start + len(f"{content}<|end|>\n")
        expected.append((len(text[:start].encode()), len(text[:end].encode())))
    assert runs(labels) == expected
    assert all(lab in (-100, i) for lab, i in zip(labels, ids))


def test_train_on_all_supervises_every_token():
    ids, labels = encode_chat(ByteTokenizer(), CONVERSATION, train_on="all")
    assert labels == ids and len(ids) > 0
    with pytest.raises(ValueError, match="train_on='everything'; valid: 'assistant', 'all'"):
        encode_chat(ByteTokenizer(), CONVERSATION, train_on="everything")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list .* got an empty list"),
    ("hello", "non-empty list .* got str"),
    (["hello"], "message 0 must be an object"),
    ([{"role": "user"}], "message 0: 'content' must be a string, got missing"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}],
     "message 1: 'role' must be a string, got int"),
])
def test_invalid_messages_are_rejected(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(ByteTokenizer(), messages, train_on="assistant")


class CountingTemplate(ByteTokenizer):
    """Starts with the number of messages: earlier turns render differently as the chat grows."""

    def render_chat(self, messages, *, add_generation_prompt):
        return f"{len(messages)}\n" + super().render_chat(
            messages, add_generation_prompt=add_generation_prompt)


class PrefixSpace(ByteTokenizer):
    """Like SentencePiece tokenizers: every encode call starts with a marker token (id 1)."""

    def encode(self, text):
        return [1] + super().encode(text)


class EndOfTextMarker(ByteTokenizer):
    """Tokens depend on where the text ends: a trailing newline gets an extra token."""

    def encode(self, text):
        return super().encode(text) + ([0] if text.endswith("\n") else [])


def test_template_that_is_not_prefix_stable_is_an_error():
    with pytest.raises(ChatTemplateError, match="not prefix-stable at assistant message 2"):
        encode_chat(CountingTemplate(), CONVERSATION, train_on="assistant")
    with pytest.raises(ChatTemplateError, match="the tokens of the conversation before it"):
        encode_chat(EndOfTextMarker(), CONVERSATION, train_on="assistant")


def test_tokenizer_that_changes_at_piece_starts_uses_the_prefix_method():
    ids, labels = encode_chat(PrefixSpace(), CONVERSATION, train_on="assistant")
    byte_ids, byte_labels = encode_chat(ByteTokenizer(), CONVERSATION, train_on="assistant")
    # Same text after the single leading marker, so the same spans one position later.
    assert ids == [1] + byte_ids
    assert runs(labels) == [(a + 1, b + 1) for a, b in runs(byte_labels)]


def test_hf_tokenizer_loads_locally(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.name == hf_dir and tok.vocab_size == len(ref) > 258
    assert tok.eos_token_id == ref.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("hello there")
    assert ref.decode(ids) == "hello there" and tok.eos_token_id not in ids


def test_hf_chat_labels_cover_exactly_the_assistant_turns(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids, labels = encode_chat(load_tokenizer(hf_dir), CONVERSATION, train_on="assistant")
    expected_text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                            for m in CONVERSATION)
    assert ref.decode(ids) == expected_text
    assert [ref.decode(ids[a:b]) for a, b in runs(labels)] == \
        [f"{m['content']}<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]
    assert all(lab in (-100, i) for lab, i in zip(labels, ids))
    assert encode_chat(load_tokenizer(hf_dir), CONVERSATION, train_on="all") == (ids, ids)


def test_hf_tokenizer_without_chat_template(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path, chat_template=None))
    assert tok.encode("hi")  # plain text still works
    with pytest.raises(ChatTemplateError, match="has no chat_template.*--data.tokenizer=byte"):
        encode_chat(tok, CONVERSATION, train_on="assistant")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nowhere': no such directory; valid: "
                                         r"--data.tokenizer=byte"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match=f"{tmp_path}'?: cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


def _bos_tokenizer(path, *, with_eos: bool) -> str:
    """A Llama-style tokenizer: its post-processor adds <s> (and, ``with_eos``, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello there", "general kenobi"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    single = "<s> $A </s>" if with_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", bos), ("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("with_eos", [False, True])
def test_text_records_keep_the_tokenizers_bos_and_get_one_eos(tmp_path, with_eos):
    """Continued pretraining on a Llama-style tokenizer: a text record is encoded as
    tokenizer(text) encodes it, <s> first, and ends with exactly one </s>."""
    import itertools

    import transformers

    from chunkflow.train.config import DataSection
    from chunkflow.train.data.dataset import DataPosition, DataStats, build_dataset

    tok_dir = _bos_tokenizer(tmp_path / "tok", with_eos=with_eos)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "hello there"}\n')
    ds = build_dataset(DataSection(path=str(data), tokenizer=tok_dir, shuffle_buffer=0),
                       vocab_size=len(hf), seed=0)
    (example, _), = itertools.islice(ds.examples(DataPosition(), DataStats()), 1)
    expected = hf("hello there")["input_ids"]
    assert expected[0] == hf.bos_token_id
    if not with_eos:
        expected = expected + [hf.eos_token_id]
    assert example.input_ids == expected and example.input_ids.count(hf.eos_token_id) == 1
