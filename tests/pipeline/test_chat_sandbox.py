"""The chat template sandbox: transformers' environment (same text), no way out to Python internals or files,
and bounds on time and size that stop templates that loop for ever or emit gigabytes."""
import re

import pytest
from transformers import AutoTokenizer

from engine.tokenizer import Tokenizer
from pipeline.formats.chat import MAX_TIMEOUTS, ChatError, ChatTemplate
from pipeline.formats.chat_sandbox import RenderLimits

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi <b>there</b> é "},
         {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Again"}]
# what templates on the Hub use: namespace, loop controls and loop state, tojson with options, dict(),
# the generation tag, raise_exception, special-token variables, whitespace control, trim_blocks/lstrip_blocks
FEATURES = """{%- set ns = namespace(system='', count=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- continue -%}{%- endif -%}
  {%- if ns.count > 5 -%}{%- break -%}{%- endif -%}
  {%- set ns.count = ns.count + 1 %}
    {{ m.role | upper }} ({{ loop.index }}/{{ loop.length }}{{ ', last' if loop.last }}): {{ m.content | trim }}
  {% generation %}{{ eos_token if m.role == 'assistant' }}{% endgeneration %}
{% endfor %}
SYSTEM={{ ns.system | tojson }} {{ messages[:1] | tojson(indent=2) }} {{ dict(x=[1, 'é']) | tojson }}
{% if messages[-1].role != 'user' %}{{ raise_exception('the last message must be the user\\'s') }}{% endif %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


@pytest.fixture(scope="module")
def llama3(chat_fleet):
    return chat_fleet["llama3"]


def template(model, source: str, limits: RenderLimits = RenderLimits()) -> ChatTemplate:
    return ChatTemplate(source, "the test", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                        Tokenizer(str(model)), limits)


def test_the_environment_renders_as_transformers_does(llama3):
    hf = AutoTokenizer.from_pretrained(str(llama3))
    expected = hf.apply_chat_template(HELLO, chat_template=FEATURES, add_generation_prompt=True, tokenize=False)
    assert template(llama3, FEATURES).prompt(HELLO) == expected
    with pytest.raises(ChatError, match="refused these messages: the last message must be the user's"):
        template(llama3, FEATURES).prompt(HELLO[:3])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ self }}",
    "{{ self._TemplateReference__context }}",
    "{{ config.items() }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages[0].__class__.__init__ }}",
    "{{ dict.mro() }}",
    "{{ range }}{{ cycler }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('true') }}",
    "{% extends '/etc/hostname' %}",
])
def test_a_template_cannot_reach_python_internals_or_files(llama3, source):
    try:
        out = template(llama3, source).prompt(HELLO)
    except ChatError as e:
        assert re.search(r"sandbox forbids|refused these messages|failed on these messages", str(e))
    else:
        assert not re.search(r"<class|object at 0x|<function|<module|root:|__", out), out


@pytest.mark.parametrize("source", [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}"
    "{% endfor %}",
    # no call, no attribute, no output inside the loops: only the loop guard sees them
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for a in range(100000) %}{% for b in range(100000) %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}",
])
def test_a_template_that_loops_for_ever_is_stopped(llama3, source):
    with pytest.raises(ChatError, match=r"ran past its time bound of 0.3 s: it loops or grows without end"):
        template(llama3, source, RenderLimits(seconds=0.3)).prompt(HELLO)


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",             # 10 GB of output
    "{% set s %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}{{ s|length }}",
    "{{ 'x' * 10 ** 10 }}",
    "{{ messages * 10 ** 9 }}",
    "{{ 'ab'|center(10 ** 10) }}",
    "{{ 'ab'.ljust(10 ** 10) }}",
    "{{ 'a\\nb'|indent(10 ** 10) }}",
    "{{ lipsum(10 ** 9) }}",
    "{{ ('x' * 1000)|replace('x', 'y' * 100000) }}",
    "{{ ('x' * 1000).replace('', 'y' * 100000) }}",
    "{{ '%99999999999d' % 1 }}",
    "{{ '{:>99999999999}'.format(1) }}",
    "{{ '%s'|format('x') ~ '%99999999999s'|format('x') }}",
    "{{ 2 ** (10 ** 9) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
])
def test_a_template_that_emits_gigabytes_is_stopped(llama3, source):
    with pytest.raises(ChatError, match=r"(built|was given|printed) .* \(the bound is 8,388,608\)|too large"):
        template(llama3, source).prompt(HELLO)


def test_a_template_past_its_time_bound_on_several_rows_is_not_tried_again(llama3):
    looping = template(llama3, "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                       RenderLimits(seconds=0.05))
    for _ in range(MAX_TIMEOUTS):
        with pytest.raises(ChatError, match="ran past its time bound"):
            looping.token_ids(HELLO)
    with pytest.raises(ChatError, match=f"on {MAX_TIMEOUTS} rows and is not tried again in this run"):
        looping.token_ids(HELLO)


def test_a_template_that_raises_or_recurses_fails_with_what_it_hit(llama3):
    with pytest.raises(ChatError, match=r"failed on these messages \(RecursionError"):
        template(llama3, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").prompt(HELLO)
    with pytest.raises(ChatError, match=r"failed on these messages \(ZeroDivisionError"):
        template(llama3, "{{ 1 // 0 }}").prompt(HELLO)
    assert template(llama3, "{{ strftime_now('%%') }}{{ messages|length }}").prompt(HELLO) == "%4"
