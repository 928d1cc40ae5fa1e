"""The sandbox chat templates run in, with bounds on time and size that Jinja itself does not have.

The environment is the one transformers renders chat templates in (an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loop controls; raise_exception, strftime_now, tojson that does not escape
HTML), so a template renders to the same text. On top of it, every render gets a budget:
- time: checked at every loop iteration (each `for` loop's iterable is wrapped when the template is
  compiled), every call, attribute and item access, namespace assignment and output chunk;
- size: of the output, of everything printed (set blocks and macros too), and of any value a call, filter
  or operator builds; `*`, `**`, `%`, `replace` and format widths are checked before they build it.
A template may print only strings, numbers, lists and dicts, so no Python object leaks into a prompt.
"""
import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import wraps

import jinja2
from jinja2 import Environment, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

LOOP_GUARD = "lorafleet_loop_guard"     # the filter every `for` loop's iterable goes through
MAX_INT_BITS = 1 << 16                   # ints a template computes (2 ** 10 ** 9 would take minutes)


class TemplateBoundExceeded(Exception):
    """A render ran past its time or size bound."""


class TemplateTimeout(TemplateBoundExceeded):
    """A render ran past its time bound."""


@dataclass(frozen=True)
class RenderLimits:
    seconds: float = 2.0
    max_chars: int = 8 << 20     # the rendered prompt, everything printed, any one value built

    def __post_init__(self):
        assert self.seconds > 0 and self.max_chars > 0, "render limits must be positive"


class _Budget:
    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.printed = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateTimeout(f"ran past its time bound of {self.limits.seconds:g} s")

    def fits(self, size: int, what: str) -> None:
        if size > self.limits.max_chars:
            raise TemplateBoundExceeded(f"{what} {size:,} (the bound is {self.limits.max_chars:,})")


_BUDGET: ContextVar[_Budget | None] = ContextVar("lorafleet_chat_budget", default=None)


def _tick() -> _Budget | None:
    budget = _BUDGET.get()
    if budget is not None:   # None outside compile_template and render
        budget.tick()
    return budget


def _checked(value):
    """value, once it is known not to be too big."""
    budget = _tick()
    if budget is not None and isinstance(value, (str, list, tuple, dict)):
        budget.fits(len(value), f"built a {type(value).__name__} of length")
    return value


def _check_size(size: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.fits(size, what)


def _check_ints(values) -> None:
    """Widths, counts and repeats above the size bound cannot build anything that fits it."""
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            _check_size(abs(v), "was given a width or count of")


def _check_format_string(text: str) -> None:
    for digits in re.findall(r"\d+", text):
        _check_size(int(digits) if len(digits) < 20 else 1 << 64, "was given a format width of")


def _check_binop(operator: str, left, right) -> None:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                _check_size(len(seq) * max(times, 0), f"built a repeated {type(seq).__name__} of length")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateBoundExceeded("multiplied numbers too large")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and max(left.bit_length(), 1) * right > MAX_INT_BITS:
            raise TemplateBoundExceeded("raised a number to too large a power")
    elif operator == "%" and isinstance(left, str):
        _check_format_string(left)
        if "*" in left:         # '%*s': a width taken from the values
            _check_ints(right if isinstance(right, tuple) else (right,))


class _LoopGuard:
    """A `for` loop's iterable: each step checks the clock, so nested loops over ranges or long strings stop."""
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        for item in self.items:
            _tick()
            yield item

    def __len__(self) -> int:       # loop.length and loop.last without materializing the items
        return len(self.items)


class _Namespace(Namespace):
    def __setitem__(self, name, value):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template may not set the namespace attribute {name!r}")
        super().__setitem__(name, _checked(value))


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks: here it only renders."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        return nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True)).set_lineno(lineno)


def _printable(value) -> bool:
    if value is None or isinstance(value, (str, int, float, jinja2.Undefined)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_printable(v) for v in value)
    return isinstance(value, dict) and all(_printable(k) and _printable(v) for k, v in value.items())


def _finalize(value) -> str:
    """What `{{ ... }}` prints, anywhere (output, set blocks, macros), counted against the budget."""
    if not _printable(value):
        raise SecurityError(f"a chat template may print strings, numbers, lists and dicts, not {type(value).__name__}")
    text = str(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.printed += len(text)
        budget.fits(budget.printed, "printed text of length")
    return text


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _check_ints(args)
        _check_ints(kwargs.values())
        if getattr(__obj, "__name__", None) == "replace" and isinstance(getattr(__obj, "__self__", None), str):
            _check_replace(__obj.__self__, *args[:2])
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__)
        return wrapped


def _check_replace(text: str, old, new) -> None:
    if isinstance(old, str) and isinstance(new, str):
        _check_size(len(text) + text.count(old) * (len(new) - len(old)) + (len(new) if not old else 0),
                    "built a replaced string of length")


def _replace(s, old, new, count=None) -> str:
    s, old, new = str(s), str(old), str(new)
    _check_replace(s, old, new)
    return s.replace(old, new, -1 if count is None else count)


def _format(value, *args, **kwargs) -> str:
    if args and kwargs:
        raise jinja2.exceptions.FilterArgumentError("format takes positional or keyword arguments, not both")
    _check_binop("%", str(value), kwargs or args)
    return str(value) % (kwargs or args)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # as transformers' templates expect: no HTML escaping, json.dumps' own options
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _template_dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)     # not the dict type itself, whose attributes reach `object`


def _guarded_filter(f):
    @wraps(f)       # keeps Jinja's pass_context / pass_eval_context marks
    def guarded(*args, **kwargs):
        value_at = next((i for i, a in enumerate(args) if not isinstance(a, (Context, EvalContext, Environment))), 0)
        _check_ints(args[value_at + 1:])     # the arguments, not the value filtered
        _check_ints(kwargs.values())
        return _checked(f(*args, **kwargs))
    return guarded


def _environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock],
                       finalize=_finalize)
    env.filters.update(tojson=_tojson, replace=_replace, format=_format)
    env.filters = {name: _guarded_filter(f) for name, f in env.filters.items()}
    env.filters[LOOP_GUARD] = _LoopGuard
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_template_dict)
    return env


_ENV = _environment()


def compile_template(source: str, limits: RenderLimits) -> jinja2.Template:
    """Raises jinja2.TemplateSyntaxError. Compiling runs the filters of constant expressions, so it is
    bounded too."""
    reset = _BUDGET.set(_Budget(limits))
    try:
        ast = _ENV.parse(source)
        for loop in list(ast.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, LOOP_GUARD, [], [], None, None).set_lineno(loop.lineno)
        return _ENV.from_string(ast)
    finally:
        _BUDGET.reset(reset)


def render(template: jinja2.Template, limits: RenderLimits, **variables) -> str:
    """The template's text for these variables. Raises TemplateBoundExceeded past the limits, jinja2's
    SecurityError for what the sandbox forbids, TemplateError for raise_exception, or whatever it hit."""
    budget = _Budget(limits)
    reset = _BUDGET.set(budget)
    chunks = template.generate(**variables)
    try:
        out, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            budget.fits(size, "built a prompt of length")
            budget.tick()
            out.append(chunk)
        return "".join(out)
    finally:
        chunks.close()
        _BUDGET.reset(reset)
