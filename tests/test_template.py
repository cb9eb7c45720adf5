"""Chat templates: both real Gemma 4 templates render exactly as transformers' apply_chat_template, string and ids."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from conftest import TOKENIZER
from gemma_mlx.errors import TemplateError
from gemma_mlx.template import ChatTemplate
from gemma_mlx.tokenizer import Tokenizer, special_tokens_map

FIXTURE = TOKENIZER
TEMPLATE_FILES = ("chat_template.jinja", "chat_template_31b_it.jinja")

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "nullable": True},
            "where": {"type": "object", "description": "Coordinates", "required": ["lat"],
                      "properties": {"lat": {"type": "number"}, "lon": {"type": "number", "nullable": True},
                                     "label": {"type": "object", "properties": {"text": {"type": "string"}}}}},
            "days": {"type": "array", "description": "Offsets", "items": {"type": "integer"}},
            "stops": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                 "properties": {"name": {"type": "string"}}}},
        },
        "required": ["city"],
    },
}}
SEARCH = {"type": "function", "function": {
    "name": "mcp:search:web", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    "response": {"type": "object", "description": "Hits"}}}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The time"}}
CALL = {"type": "function", "function": {"name": "get_weather",
                                         "arguments": {"city": "Paris, {FR}", "where": {"lat": 48.85}, "days": [1, 2]}}}

CHATS = {
    "single": ([{"role": "user", "content": "Hello there!"}], None),
    "system_multi_turn": ([
        {"role": "system", "content": "  You are terse. "},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}], None),
    "developer_role": ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "media_parts": ([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": " Describe this, then the sound. "}, {"type": "audio"},
        {"type": "video"}, {"type": "text", "text": "And the clip."}]}], None),
    "tool_declarations": ([{"role": "user", "content": "Weather?"}], [WEATHER, SEARCH, NO_PARAMS]),
    "native_tool_responses": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {"type": "function", "function": {
            "name": "mcp:search:web", "arguments": {"q": "paris \"weather\": today"}}}],
         "tool_responses": [{"name": "get_weather", "response": {"temperature": 21, "sky": "clear, {mild}"}},
                            {"name": "mcp:search:web", "response": ["a", "b"]}]},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks"}], [WEATHER, SEARCH]),
    "openai_tool_messages": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [dict(CALL, id="call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21 degrees."}], [WEATHER]),
    "pending_tool_result": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [dict(CALL, id="c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}], [WEATHER]),
    "reasoning_history": ([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nold thought<channel|>Hello!"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL],
         "tool_responses": [{"name": "get_weather", "response": 21}]},
        {"role": "assistant", "thinking": "Alias.", "tool_calls": [CALL]}], [WEATHER]),
}


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURE)


@pytest.fixture(scope="module", params=TEMPLATE_FILES)
def template(request, tmp_path_factory) -> ChatTemplate:
    d = tmp_path_factory.mktemp("template")
    shutil.copy(FIXTURE / "tokenizer_config.json", d)
    shutil.copy(FIXTURE / request.param, d / "chat_template.jinja")
    return ChatTemplate.from_dir(d)


def hf_render(hf, template, messages, **kwargs):
    return hf.apply_chat_template(messages, chat_template=template.source, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_equals_transformers(template, hf, tok, name, thinking, generation_prompt):
    messages, tools = CHATS[name]
    before = copy.deepcopy(messages)
    got = template.render(messages, tools=tools, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    want = hf_render(hf, template, messages, tools=tools, add_generation_prompt=generation_prompt,
                     enable_thinking=thinking)
    assert got == want
    ids = tok.encode(got)
    assert ids == hf.apply_chat_template(messages, chat_template=template.source, tools=tools, tokenize=True,
                                         return_dict=False, add_generation_prompt=generation_prompt,
                                         enable_thinking=thinking)
    assert ids[0] == 2 and ids.count(2) == 1  # the template writes <bos>; nothing adds a second one
    assert messages == before  # the caller's messages are not touched


def test_special_tokens_equal_transformers(hf):
    assert special_tokens_map(json.loads((FIXTURE / "tokenizer_config.json").read_text())) == hf.special_tokens_map


def test_generation_prompt_and_thinking_switch(template, hf):
    messages = CHATS["single"][0]
    off = template.render(messages)
    assert off == hf_render(hf, template, messages, add_generation_prompt=True)  # transformers' default: no kwarg
    assert off.startswith("<bos><|turn>user\nHello there!<turn|>\n")
    assert off.endswith("<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    on = template.render(messages, enable_thinking=True)
    assert on.startswith("<bos><|turn>system\n<|think|>") and on.endswith("<|turn>model\n")


def test_tool_declaration_text(template):
    messages, tools = CHATS["tool_declarations"]
    text = template.render(messages, tools=tools)
    assert ('<|tool>declaration:get_weather{description:<|"|>Current weather for a city<|"|>,parameters:{properties:'
            '{city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>}') in text
    assert 'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>' in text
    assert 'lon:{nullable:true,type:<|"|>NUMBER<|"|>}' in text and "<|tool>declaration:mcp:search:web{" in text
    if "format_tool_response_block" in template.source:  # the 31B-it revision
        assert 'unit:{enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],nullable:true,type:<|"|>STRING<|"|>}' in text
        assert 'label:{properties:{text:{type:<|"|>STRING<|"|>}},type:<|"|>OBJECT<|"|>}' in text
    else:
        # The 12B template's own slips, reproduced faithfully: an object or array parameter without a description
        # opens with a stray comma and loses the one before its type.
        assert 'unit:{nullable:true,enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}' in text
        assert 'label:{,properties:{text:{type:<|"|>STRING<|"|>}}type:<|"|>OBJECT<|"|>}' in text
        assert 'stops:{,items:{' in text


def test_template_features_match_transformers(hf, tmp_path):
    # tojson (no HTML escaping, indent), namespace, dict(), loop controls, strftime_now, generation tag,
    # special tokens and extra variables: every environment feature transformers provides.
    source = ("{%- set ns = namespace(n=0) -%}"
              "{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}"
              "{%- set ns.n = ns.n + 1 -%}{{ m.content | tojson }};{%- endfor -%}"
              "{{ {'<b>': 'é&'} | tojson(indent=1) }}{{ dict(a=1, b=[true, none]) | tojson(sort_keys=true) }}"
              "{{ ns.n }}{{ bos_token }}{{ eos_token }}{{ mask_token }}{{ custom }}{{ strftime_now('%Y') }}"
              "{% generation %}[{{ tools | length }}]{% endgeneration %}{{ documents | tojson }}"
              "{{ messages[0].name is defined }}{{ messages[1].reasoning_content }}")
    (tmp_path / "chat_template.jinja").write_text(source)
    shutil.copy(FIXTURE / "tokenizer_config.json", tmp_path)
    messages = [{"role": "user", "content": "a\"<b>", "name": None}, {"role": "user", "content": "é", "thinking": "t"},
                {"role": "user", "content": "never"}]
    kwargs = dict(tools=[NO_PARAMS], documents=[{"title": "t", "text": "x"}], custom={"k": 1})
    got = ChatTemplate.from_dir(tmp_path).render(messages, add_generation_prompt=False, **kwargs)
    assert got == hf.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    assert '"a\\"<b>";"é";{\n "<b>": "é&"\n}' in got and str(datetime.now().year) in got


def test_function_tools_become_schemas(template, hf):
    def get_time(zone: str, precise: bool = False) -> str:
        """Current time in a zone.

        Args:
            zone: IANA zone name
            precise: With seconds
        """

    messages = CHATS["single"][0]
    got = template.render(messages, tools=[get_time])
    assert got == hf_render(hf, template, messages, tools=[get_time], add_generation_prompt=True)
    assert "declaration:get_time{description:<|\"|>Current time in a zone." in got


def test_template_lookup_order(tmp_path):
    tokens = {"bos_token": {"content": "<s>", "special": True}, "extra_special_tokens": {"image_token": "<img>"}}
    config = {**tokens, "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ image_token }}"},
                                          {"name": "tool_use", "template": "T{{ tools | length }}"},
                                          {"name": "rag", "template": "R"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    msgs = [{"role": "user", "content": "x"}]
    t = ChatTemplate.from_dir(tmp_path)
    assert t.render(msgs) == "D<s><img>" and t.render(msgs, tools=[NO_PARAMS]) == "T1"
    assert t.render(msgs, template_name="rag") == "R"
    assert ChatTemplate.from_dir(tmp_path, special_tokens={"bos_token": "<B>"}).render(msgs) == "D<B><img>"
    with pytest.raises(TemplateError, match="no chat template named 'nope'"):
        t.render(msgs, template_name="nope")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tokens, "chat_template": [
        {"name": "rag", "template": "R"}]}))
    with pytest.raises(TemplateError, match="none is 'default'"):
        ChatTemplate.from_dir(tmp_path).render(msgs)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tokens, "chat_template": "S"}))
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == "S"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokens))
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == "from json"
    (tmp_path / "chat_template.json").unlink()
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatTemplate.from_dir(tmp_path)


class Image:
    """A rich object in a message part, like a decoded image: its methods must not be reachable from a template."""

    def __init__(self, path: Path):
        self.path = path

    def save(self):
        self.path.write_text("written by the template")
        return "saved"


def test_template_errors_are_typed(tmp_path):
    msgs = [{"role": "user", "content": "x"}]
    cases = {
        "{{ raise_exception('no system role, please') }}": "no system role, please",
        "line one\n{{ messages[0]['content'] + 1 }}": r"template line 2: TypeError",
        "{{ ''.__class__.__mro__ }}": "refused",
        "{% set ns = namespace(_hidden=1) %}": "_hidden",
        "{{ messages[0].content[0].image.save() }}": "refused",
    }
    for source, message in cases.items():
        with pytest.raises(TemplateError, match=message):
            ChatTemplate(source).render([{"role": "user", "content": [{"type": "image", "image": Image(
                tmp_path / "x")}]}] if "save" in source else msgs)
    assert not (tmp_path / "x").exists()
    with pytest.raises(TemplateError, match=r"does not parse \(line 2\)"):
        ChatTemplate("ok\n{% for %}")
    with pytest.raises(TemplateError, match="empty conversation"):
        ChatTemplate("x").render([])
    with pytest.raises(TemplateError, match="'role'"):
        ChatTemplate("x").render([{"content": "no role"}])
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TemplateError, match="not valid JSON"):
        ChatTemplate.from_dir(tmp_path)
