"""Chats as people have them: OpenAI tool calls and content parts, templates that render the
last assistant turn differently (Qwen3), templates with generation markers. Each trains on
the tokens its template renders, with the assistant turns (tool calls included) supervised."""

import json
import re

import pytest
import transformers

from chunkflow.train.data.dataset import DataError
from chunkflow.train.data.tokenizer import HFTokenizer, encode_chat
from tests.train.data.test_data import dataset, take, write_jsonl
from tests.train.data.test_tokenizer import make_hf_tokenizer

NL = "{{ '\\n' }}"
# Qwen3's shape: an empty think block in the last assistant turn only (not prefix-stable).
THINK_LAST = ("{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
              "<|im_start|>assistant" + NL + "{%- if loop.last -%}<think>" + NL + NL
              + "</think>" + NL + NL + "{%- endif -%}{{ m.content }}<|im_end|>" + NL
              + "{%- else -%}<|im_start|>{{ m.role }}" + NL + "{{ m.content }}<|im_end|>" + NL
              + "{%- endif -%}{%- endfor -%}"
              "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}")
# Tools and tool calls, ChatML-like (prefix-stable).
TOOLS = ("{%- if tools -%}<|im_start|>system" + NL + "tools: {{ tools | tojson }}<|im_end|>"
         + NL + "{%- endif -%}{%- for m in messages -%}<|im_start|>{{ m.role }}" + NL
         + "{%- if m.content -%}{{ m.content }}{%- endif -%}"
         "{%- for c in m.tool_calls or [] -%}<tool_call>{{ c.function | tojson }}</tool_call>"
         "{%- endfor -%}<|im_end|>" + NL + "{%- endfor -%}"
         "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}")
# Generation markers: the end-of-turn newline is outside the assistant's tokens.
MARKED = ("{%- for m in messages -%}{%- if m.role == 'assistant' -%}<|im_start|>assistant" + NL
          + "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}" + NL
          + "{%- else -%}<|im_start|>{{ m.role }}" + NL + "{{ m.content }}<|im_end|>" + NL
          + "{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}")

CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine, thanks"}]


def supervised_text(tok_dir: str, ids: list[int], labels: list[int]) -> list[str]:
    """The supervised runs of tokens, decoded."""
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    runs, run = [], []
    for t, label in zip(ids, labels):
        if label != -100:
            assert label == t
            run.append(t)
        elif run:
            runs.append(hf.decode(run))
            run = []
    return runs + ([hf.decode(run)] if run else [])


def test_a_template_that_renders_the_last_turn_differently_is_masked(tmp_path):
    """Qwen3 adds an empty think block to the last assistant turn only: every multi-turn chat
    was refused as not prefix-stable. The turns are found in the whole rendering instead."""
    tok_dir = make_hf_tokenizer(tmp_path / "tok", chat_template=THINK_LAST)
    tok = HFTokenizer(tok_dir)
    ids, labels = encode_chat(tok, CHAT, train_on="assistant")
    assert tok.encode(tok.render_chat(CHAT, add_generation_prompt=False)) == ids
    assert "<think>" in tok.render_chat(CHAT, add_generation_prompt=False)
    assert supervised_text(tok_dir, ids, labels) == ["hi<|im_end|>", "fine, thanks<|im_end|>"]


def test_generation_markers_decide_where_the_template_has_them(tmp_path):
    tok_dir = make_hf_tokenizer(tmp_path / "tok", chat_template=MARKED)
    tok = HFTokenizer(tok_dir)
    assert tok.marks_generation
    ids, labels = encode_chat(tok, CHAT, train_on="assistant")
    # the prefix difference would also take the newline after <|im_end|>
    assert supervised_text(tok_dir, ids, labels) == ["hi<|im_end|>", "fine, thanks<|im_end|>"]


def test_openai_tool_calls_and_content_parts_train_like_their_plain_chat(tmp_path):
    tok_dir = make_hf_tokenizer(tmp_path / "tok", chat_template=TOOLS)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    openai = [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                           {"type": "text", "text": "there"}]},
              {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": "sunny"},
              {"role": "assistant", "content": "fine, thanks"}]
    plain = [dict(m, content="hello there") if i == 0 else m for i, m in enumerate(openai)]
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": openai, "tools": tools}, {"messages": plain, "tools": tools},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": plain, "tools": "weather"}])
    ds, _ = dataset(path, tokenizer=HFTokenizer(tok_dir), vocab_size=512)
    first, second = take(ds, 2)
    assert first.input_ids == second.input_ids and first.labels == second.labels
    rendered = transformers.AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(
        plain, tools=tools, tokenize=False)
    assert "tools: " in rendered and "<tool_call>" in rendered
    call_text = "<tool_call>" + json.dumps(call["function"]).replace(" ", "") + "</tool_call>"
    runs = supervised_text(tok_dir, first.input_ids, first.labels)
    assert [r.replace(" ", "") for r in runs] == [call_text + "<|im_end|>\n",
                                                  "fine,thanks<|im_end|>\n"]
    with pytest.raises(DataError, match=re.escape(
            f"{path}:3: 'messages': message 0: content part 0 is 'image_url', not text")):
        take(ds, 3)
    bad_tools = write_jsonl(tmp_path / "b.jsonl", [{"messages": plain, "tools": "weather"}])
    with pytest.raises(DataError, match=f"{bad_tools}:1: 'tools' must be a non-empty array"):
        take(dataset(bad_tools, tokenizer=HFTokenizer(tok_dir), vocab_size=512)[0], 1)
    # the byte tokenizer's template has no tool calls: refused, naming what would work
    with pytest.raises(DataError, match="tool calls and a 'tools' list need the chat template "
                                        "of the model's tokenizer"):
        take(dataset(path)[0], 1)


def test_a_template_that_cannot_be_masked_is_refused_before_training(tmp_path, capsys):
    """A template that drops an earlier assistant turn's text cannot be masked by any method:
    the run stops at its start, naming the first chat record, not mid-run."""
    from chunkflow.cli import main
    from tests.train.run.test_trainer import args

    drops = ("{%- for m in messages -%}<|im_start|>{{ m.role }}" + NL
             + "{%- if m.role != 'assistant' or loop.last -%}{{ m.content }}{%- endif -%}"
             "<|im_end|>" + NL + "{%- endfor -%}"
             "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}")
    tok_dir = make_hf_tokenizer(tmp_path / "tok", chat_template=drops)
    records = [{"text": "plain"}] * 3 + [{"messages": CHAT}] * 20
    data = write_jsonl(tmp_path / "a.jsonl", records)
    assert main(["train", *args(tmp_path / "run", **{
        "data.path": data, "data.tokenizer": tok_dir, "model.vocab_size": "512",
        "train.steps": "2"})]) == 2
    err = capsys.readouterr().err
    assert f"{data}:4 is a chat, and the chat template of tokenizer" in err
    assert "is not prefix-stable" in err
    assert not (tmp_path / "run").exists()
