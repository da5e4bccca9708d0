"""What to make: the recipe schema, label distributions and prompt templates.

The lowest layer: imports only `synthgen.errors`, pydantic, numpy and PyYAML — no torch, no file
I/O beyond reading the YAML — so `synthgen validate` and `synthgen schema` start in a second.
"""
