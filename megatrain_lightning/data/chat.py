"""Chat data the way instruction-tuned models are fine-tuned: conversations rendered with the model's own chat
template (its `tokenizer_config.json`), trained on the assistant's turns only.

The template is a Jinja2 program; it renders here as transformers' `apply_chat_template` renders it (a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, its `tojson`, `raise_exception` and
`strftime_now`, and the special tokens as variables), so the text a model was tuned on is the text it trains on.

Where the assistant turns are: for the k-th message, if it is the assistant's, the conversation up to it rendered
with the generation prompt is a prefix of the whole, and so is the conversation up to and including it; what lies
between is the turn (with its end-of-turn marker, so the model learns to stop). A template that renders a
conversation's start differently inside the whole (one that drops earlier reasoning, say) is refused: its turns
cannot be located.
"""

from __future__ import annotations

import json
from array import array
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from megatrain_lightning.data.loading import require_file
from megatrain_lightning.data.packed import PackedDataModule, records, token_array
from megatrain_lightning.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A record's conversation as role/content messages: `messages` as it is, ShareGPT's `conversations`
    (from/value), or Alpaca's `instruction` (+ `input`) and `output`."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        out = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        out = []
        for t in turns:
            if t.get("from") not in SHAREGPT_ROLES:
                raise UserError(f"{where}: ShareGPT role {t.get('from')!r} is not one of {sorted(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise UserError(f"{where}: a chat record needs 'messages' (role/content), 'conversations' (ShareGPT) or "
                        "'instruction' and 'output' (Alpaca)")
    for m in out:
        if m["role"] not in ROLES:
            raise UserError(f"{where}: role {m['role']!r} is not one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: a {m['role']} message has no text content")
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn to train on")
    return out


def _generation_extension():
    """`{% generation %}...{% endgeneration %}`, which templates use to mark the assistant's text for
    transformers' `return_assistant_tokens_mask`: rendered as its body, as transformers renders it (the turns are
    found here by prefixes instead)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str], name: str = "chat template") -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers' (no escaping)
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_extension()])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.name, self.special = name, dict(special)
        self._errors = (jinja2.exceptions.TemplateError,)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UserError(f"{name}: not a valid Jinja2 template (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_config(cls, path: str | Path) -> ChatTemplate:
        """From a `tokenizer_config.json` (its `chat_template`: one string, or a list of named ones whose 'default'
        is used), or a `chat_template.jinja` beside it; the special tokens from the same config."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data.chat_template: {path} does not exist")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"data.chat_template: {path} is not valid JSON ({e})") from None
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None and (path.parent / "chat_template.jinja").is_file():
            source = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str):
            raise UserError(f"data.chat_template: {path} has no chat_template (nor a chat_template.jinja beside it)")
        special = {}
        for key in SPECIAL_TOKENS:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special, name=str(path))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, where: str = "") -> str:
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special)
        except self._errors as e:
            raise UserError(f"{where or self.name}: the chat template refused the conversation: {e}") from None

    def assistant_spans(self, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character ranges of its assistant turns."""
        text = self.render(messages, where=where)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True, where=where)
            upto = self.render(messages[:k + 1], where=where)
            if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
                raise UserError(f"{where}: {self.name} renders the conversation up to assistant turn {k} differently "
                                "inside the whole conversation, so its tokens cannot be located (templates that "
                                "rewrite earlier turns are not supported)")
            spans.append((len(before), len(upto)))
        return text, spans


def encode(tokenizer, template: ChatTemplate, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation (special tokens as the template writes them) and a 0/1 mask: 1 for
    tokens that start inside an assistant turn."""
    text, spans = template.assistant_spans(messages, where)
    enc = tokenizer.encode(text, add_special_tokens=False)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in enc.offsets]
    return enc.ids, mask


class ChatDataModule(PackedDataModule):
    """JSON lines of conversations (`messages`, ShareGPT `conversations` or Alpaca `instruction`/`output`, chat.py),
    rendered with the model's chat template and trained on the assistant's turns only. Conversations are packed back
    to back like the other token data: attention is causal over the window, so a conversation's tokens may attend to
    the end of the one before it; labels exist only inside assistant turns."""

    def __init__(self, path: str | Path, tokenizer: str | Path, chat_template: str | Path | None = None,
                 seq_len: int = 2048, micro_batch: int = 1, val_fraction: float = 0.01, seed: int = 0,
                 vocab_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__(seq_len, micro_batch, val_fraction, seed, vocab_size, num_workers)
        self.path, self.tokenizer_path = Path(path), Path(tokenizer)
        # default: the tokenizer_config.json beside the tokenizer.json (a Hugging Face model directory)
        self.template_path = Path(chat_template) if chat_template else self.tokenizer_path.parent / "tokenizer_config.json"

    def _tokens(self) -> tuple[np.ndarray, np.ndarray]:
        tok = self._tokenizer()
        template = ChatTemplate.from_config(self.template_path)
        path = require_file(self.path, "data file")
        tokens, mask = array("I"), array("B")
        for lineno, record in records(path):
            where = f"{path}:{lineno}"
            ids, trained = encode(tok, template, to_messages(record, where), where)
            tokens.extend(ids)
            mask.extend(trained)
        return token_array(tokens, tok), np.frombuffer(mask, dtype=np.uint8)
