"""Everything that makes pixels: pipeline loading, LoRA, device tuning, DDIM, the prompt cache and
the batch renderer.

May import `synthgen.plan`, `synthgen.recipe`, `synthgen.hashing` and `synthgen.errors`; knows
nothing of OUT, processes or Ray. `model_files` imports no torch (validation uses it).
"""
