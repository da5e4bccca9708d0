"""Prompt templates: `str.format` fields over label names, and nothing else.

A template is user input, so attribute and index access (`{age.__class__}`, `{sex[0]}`),
conversions and nested fields are refused before anything is formatted.
"""

from __future__ import annotations

import re
from string import Formatter

_FORMAT_SPEC = re.compile(r"[<>=^+\- #0-9,_.a-zA-Z%]*")
MAX_FORMAT_WIDTH = 100  # a width or precision beyond this only pads the prompt past the encoder


def template_fields(template: str) -> list[str]:
    """Label names the template uses, in order; ValueError if it does more than name them."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt is not a valid template: {exc}") from None
    names = []
    for _, field, format_spec, conversion in parsed:
        if field is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field):
            raise ValueError(
                f"prompt field '{{{field}}}' must be a bare label name (no attributes or indexing)"
            )
        if conversion or (format_spec and not _FORMAT_SPEC.fullmatch(format_spec)):
            raise ValueError(f"prompt field '{{{field}}}' may only carry a plain format spec")
        if any(int(number) > MAX_FORMAT_WIDTH for number in re.findall(r"[0-9]+", format_spec)):
            raise ValueError(
                f"prompt field '{{{field}}}' asks a width or precision over {MAX_FORMAT_WIDTH}"
            )
        names.append(field)
    return names


def render_prompt(template: str, values: dict[str, object]) -> str:
    """Fill the template; values are label values already turned into their prompt form."""
    return template.format_map(values)
