"""A model's own chat template (tokenizer_config.json's Jinja `chat_template`), rendered as
transformers' `apply_chat_template` renders it, so an imported instruct model keeps its format.

The environment is transformers' (`_compile_jinja_template`): a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`, a `tojson` that does
not escape HTML, `strftime_now`, and the `{% generation %}` tag (rendered as its body: gptstack
finds the assistant's tokens by rendering prefixes, see `Tokenizer.render_conversation`). Templates
from the Hub are untrusted code, hence the sandbox.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..common import UserError


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template a HF tokenizer directory holds, as `AutoTokenizer` picks it: chat_template.jinja
    (transformers >= 4.43 writes it; it wins), else tokenizer_config.json's `chat_template` (a string,
    or a list of {name, template}: the one named "default"); None when there is none."""
    directory = Path(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{jinja_file}: cannot read ({e})") from None
    path = directory / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read as JSON ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if template is None or isinstance(template, str):
        return template or None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{path}: chat_template: a list of named templates without a 'default' one "
                        f"(names: {sorted(str(n) for n in named)})")
    raise UserError(f"{path}: chat_template: expected a string or a list of {{name, template}}, "
                    f"got {type(template).__name__}")


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The compiled template (cached: every render of a run uses the same one); UserError on bad Jinja."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (TRL's assistant markers): just the body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def render(source: str, messages, roles: dict[str, str], add_generation_prompt: bool, name: str) -> str:
    """The text `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` gives, with
    the tokenizer's bos/eos/pad token strings (`roles`) as template variables."""
    template = compile_template(source)
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers passes them
    try:
        return template.render(messages=plain, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **roles)
    except Exception as e:  # raise_exception's TemplateError, or whatever else the template's code raises
        raise UserError(f"chat template of {name}: {type(e).__name__}: {e}") from None
