"""Chat templates: checking a conversation, the Jinja sandbox templates render in, and reading a template
out of tokenizer_config.json. `Tokenizer.apply_chat_template` (in `base`) puts these together.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxinfer.tokenizer.errors import TokenizerError


def _validate_messages(messages: list[dict]) -> None:
    """Reject a conversation the template could only render wrongly, naming the bad field."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise TokenizerError(f"messages[{index}] has no {field!r}")
            if not isinstance(message[field], str):
                raise TokenizerError(f"messages[{index}][{field!r}] must be a str, got {type(message[field]).__name__}")


@functools.cache
def _jinja_environment() -> jinja2.Environment:
    """A sandbox set up like transformers' chat-template environment, so templates render the same."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _config_template(config: dict) -> str | None:
    """tokenizer_config.json's chat template: a string, or a list of named templates ("default" wins)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
