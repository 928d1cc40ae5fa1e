"""Chat requests: a row's `messages` rendered with its chat template, as transformers'
`apply_chat_template(messages, add_generation_prompt=True)` renders them, and tokenized.

The template: an adapter directory's own, for that adapter's rows (PEFT saves one when training changed the
tokenizer), else the base checkpoint's. In a directory, `chat_template.jinja` (and named ones in
`additional_chat_templates/*.jinja`) come before `chat_template` in tokenizer_config.json (a string, or a
list of {name, template}); of several, the one named `default` is used. Templates run in
pipeline.formats.chat_sandbox; a template that fails, or a checkpoint without one, fails the rows that need it.

Control tokens typed into a message are text: before rendering, each control token inside a message (the
tokenizer's special tokens, and any added token the template itself writes) is wrapped in two private-use
characters that occur nowhere else; the rendered prompt is split at them, and the wrapped text is encoded
with added tokens spelled out as ordinary text. A prompt without such text is encoded in one piece, so its
ids are exactly those of transformers' `apply_chat_template(..., tokenize=True)`.
"""
import json
import os
import re

import jinja2

from engine.tokenizer import Tokenizer, token_content
from pipeline.formats.chat_sandbox import RenderLimits, TemplateBoundExceeded, TemplateTimeout, compile_template, render
from pipeline.storage import filesystem, join

TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATES = "additional_chat_templates"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FILE_MAX_BYTES = 1 << 20   # a template file or tokenizer_config.json is never larger
MAX_TIMEOUTS = 3        # a template past its time bound on this many rows is not tried on the rest of the run


class ChatError(Exception):
    """Why a chat row cannot become a prompt; str(e) says what to do."""


def message_problems(messages) -> list[str]:
    """What is wrong with a row's messages (a list of {role, content}), each with what to do."""
    if not isinstance(messages, list) or not messages:
        return ["messages is empty: give at least one {role, content} message"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            problems.append(f"messages[{i}] = {m!r:.80} is not a message: give objects with role and content only")
        elif not isinstance(m.get("role"), str) or not m["role"]:
            problems.append(f"messages[{i}].role is missing or empty: give each message a role (system, user, ...)")
        elif not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}].content is not a string: give each message its text")
    return problems


def _read_small(fs, path: str, inside: str | None) -> bytes | None:
    """A file of a checkpoint or adapter directory (None when missing), at most FILE_MAX_BYTES; with `inside`
    (an adapter root on a local disk) only a file that resolves inside it: a symlink out of it is refused."""
    if not fs.isfile(path):
        return None
    if inside is not None and "file" in fs.protocol:
        real_root = os.path.realpath(inside)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ChatError(f"{path} leads out of the adapter root {inside}: put the file itself in the adapter's "
                            "folder")
    with fs.open(path, "rb") as f:
        raw = f.read(FILE_MAX_BYTES + 1)
    if len(raw) > FILE_MAX_BYTES:
        raise ChatError(f"{path} is over {FILE_MAX_BYTES >> 20} MiB: no chat template or tokenizer config is")
    return raw


def read_chat_templates(dir_url: str, storage_options: dict | None = None,
                        inside: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """({name: template}, the special-token variables bos_token, eos_token, ...) of a checkpoint or adapter
    directory; no templates when it has none. `inside`: the adapter root an adapter's files must stay in.
    Raises ChatError when its files cannot be read."""
    try:
        fs, root = filesystem(dir_url, storage_options)
        raw_config = _read_small(fs, join(root, "tokenizer_config.json"), inside)
        config = json.loads(raw_config) if raw_config is not None else {}
        templates = {}
        if (default := _read_small(fs, join(root, TEMPLATE_FILE), inside)) is not None:
            templates["default"] = default.decode("utf-8")
        for path in sorted(fs.glob(join(root, NAMED_TEMPLATES, "*.jinja"))):
            templates[path.rsplit("/", 1)[-1].removesuffix(".jinja")] = _read_small(fs, path, inside).decode("utf-8")
    except ChatError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable files, bad JSON, bad UTF-8, JSON nested too deeply
        raise ChatError(f"cannot read the chat template in {dir_url} ({type(e).__name__}: {e}): "
                        "fix its files") from None
    if not isinstance(config, dict):
        raise ChatError(f"{dir_url}/tokenizer_config.json is not a JSON object: fix it")
    in_config = config.get("chat_template")
    if not templates and isinstance(in_config, str):
        templates["default"] = in_config
    elif not templates and isinstance(in_config, list):        # [{"name": ..., "template": ...}, ...]
        templates = {t["name"]: t["template"] for t in in_config
                     if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    variables = {name: token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return templates, {name: value for name, value in variables.items() if isinstance(value, str)}


class ChatTemplate:
    """One template, compiled once, and the control tokens of its tokenizer."""

    def __init__(self, source: str, where: str, variables: dict[str, str], tokenizer: Tokenizer,
                 limits: RenderLimits):
        self.where, self.variables, self.limits, self.tokenizer = where, variables, limits, tokenizer
        self.timeouts = 0
        try:
            self.template = compile_template(source, limits)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"the chat template of {where} does not compile (line {e.lineno}: {e.message}): "
                            "fix the template") from None
        except TemplateBoundExceeded as e:
            raise ChatError(f"the chat template of {where} {e} while compiling: fix the template") from None
        except Exception as e:  # noqa: BLE001 - e.g. RecursionError on deep nesting: the rows fail, not the run
            raise ChatError(f"the chat template of {where} does not compile ({type(e).__name__}): "
                            "fix the template") from None
        added = tokenizer.added_tokens
        control = sorted((t for t, (_, special) in added.items() if special or (t in source and not t.isspace())),
                         key=len, reverse=True)
        self.control_ids = {added[t][0] for t in control}
        self.control_re = re.compile("|".join(map(re.escape, control))) if control else None
        self.own_texts = [source, *variables.values()]

    def token_ids(self, messages: list[dict]) -> list[int]:
        strings = [v for m in messages for v in m.values()]
        if self.control_re is None or not any(self.control_re.search(s) for s in strings):
            return self.tokenizer.encode_rendered(self.prompt(messages))
        start, end = markers = _markers(strings + self.own_texts)
        marked = [{k: self.control_re.sub(lambda t: f"{start}{t[0]}{end}", v) for k, v in m.items()} for m in messages]
        return self._encode(self.prompt(marked), markers)

    def prompt(self, messages: list[dict]) -> str:
        """The rendered text, generation prompt added. Raises ChatError."""
        if self.timeouts >= MAX_TIMEOUTS:
            raise ChatError(f"the chat template of {self.where} ran past its time bound on {MAX_TIMEOUTS} rows and "
                            "is not tried again in this run: fix the template")
        try:
            return render(self.template, self.limits, messages=messages, tools=None, documents=None,
                          add_generation_prompt=True, **self.variables)
        except TemplateBoundExceeded as e:
            self.timeouts += isinstance(e, TemplateTimeout)
            raise ChatError(f"the chat template of {self.where} {e}: it loops or grows without end; "
                            "fix the template") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatError(f"the chat template of {self.where} did what the sandbox forbids ({e}): "
                            "fix the template") from None
        except jinja2.TemplateError as e:     # raise_exception('...'), or an undefined value used
            raise ChatError(f"the chat template of {self.where} refused these messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - whatever the template hit fails this row only
            raise ChatError(f"the chat template of {self.where} failed on these messages "
                            f"({type(e).__name__}: {e})") from None

    def _encode(self, text: str, markers: tuple[str, str]) -> list[int]:
        """Split at the wrapped control tokens (a lone marker, left by a template that cut a message, splits
        too); the text between is encoded as usual, the wrapped tokens as plain text."""
        start, end = markers
        pieces = re.split(f"{start}({self.control_re.pattern}){end}|[{start}{end}]", text)
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.tokenizer.encode_rendered(piece) if piece else []
            elif piece is not None:
                as_text = self.tokenizer.encode_as_text(piece)
                if self.control_ids.intersection(as_text):
                    raise ChatError(f"a message contains {piece!r}, which this tokenizer can only encode as the "
                                    "control token itself: remove it from the message")
                ids += as_text
        return ids


def _markers(texts: list[str]) -> tuple[str, str]:
    """Two private-use characters that occur in none of the texts."""
    used = set().union(*map(set, texts))
    for code in range(0xE000, 0xF8FF, 2):
        pair = chr(code), chr(code + 1)
        if not used.intersection(pair):
            return pair
    raise ChatError("the messages use every private-use character (U+E000-U+F8FF) and a control token: "
                    "remove the control token from the message")


class ChatPrompts:
    """The prompt token ids of chat rows: the base checkpoint's template, or an adapter's own for its rows."""

    def __init__(self, tokenizer: Tokenizer, model_url: str, adapters_url: str | None = None,
                 storage_options: dict | None = None, limits: RenderLimits = RenderLimits()):
        self.tokenizer, self.adapters_url, self.storage_options, self.limits = \
            tokenizer, adapters_url, storage_options, limits
        where = f"the base checkpoint {model_url}"
        self.base_variables: dict[str, str] = {}
        try:
            templates, self.base_variables = read_chat_templates(model_url, storage_options)
            self.base = self._template(templates, where, self.base_variables) if templates else ChatError(
                f"{where} has no chat template (no chat_template in its tokenizer_config.json, no {TEMPLATE_FILE}): "
                "add one, or give these rows a prompt instead of messages")
        except ChatError as e:
            self.base = e
        self.by_adapter: dict[str, ChatTemplate | ChatError | None] = {}    # None: the adapter has none of its own

    def token_ids(self, messages: list[dict], adapter_id: str | None) -> list[int]:
        """Raises ChatError, which says what to do."""
        return self.template(adapter_id).token_ids(messages)

    def template(self, adapter_id: str | None) -> ChatTemplate:
        """The template of an adapter's rows (None: the base model's). Raises ChatError."""
        template = self.base
        if adapter_id is not None and self.adapters_url:
            if adapter_id not in self.by_adapter:
                self.by_adapter[adapter_id] = self._adapter_template(adapter_id)
            template = self.by_adapter[adapter_id] or self.base
        if isinstance(template, ChatError):
            raise ChatError(str(template))      # a new one each row: raising one again would grow its traceback
        return template

    def _adapter_template(self, adapter_id: str) -> ChatTemplate | ChatError | None:
        try:
            templates, variables = read_chat_templates(join(self.adapters_url, adapter_id), self.storage_options,
                                                       inside=filesystem(self.adapters_url, self.storage_options)[1])
        except ChatError as e:
            return e
        where = f"adapter {adapter_id}"
        return self._template(templates, where, {**self.base_variables, **variables}) if templates else None

    def _template(self, templates: dict[str, str], where: str, variables: dict[str, str]) -> ChatTemplate | ChatError:
        if "default" not in templates:
            return ChatError(f"{where} has several chat templates ({', '.join(sorted(templates))}) and none named "
                             "'default': name the one to use 'default'")
        try:
            return ChatTemplate(templates["default"], where, variables, self.tokenizer, self.limits)
        except ChatError as e:
            return e
