"""Everything that makes pixels: pipeline loading, the built-in presets, LoRA (the `lora`
subpackage), device tuning, DDIM, the prompt cache, the batch renderer, and the quality gate
(`networks` loads a user's check or audit model by its bytes, `gate` judges batches, `gated`
renders again what fails).

May import `synthgen.plan`, `synthgen.recipe`, `synthgen.hashing`, `synthgen.weight_files` and
`synthgen.errors`; knows nothing of OUT, processes or Ray. `model_files`, `presets`,
`prompt_tokenizer` and `lora.layout`/`lora.base_modules`/`lora.fit` import no torch (validation
uses them).
"""
