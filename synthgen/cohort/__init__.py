"""Real data in: cohort tables, image files and label tables — the privacy firewall.

From here on only row numbers, declared label values and pixels travel; no message names a path,
an id or a cell's content. May import `synthgen.recipe` and `synthgen.errors`.
"""
