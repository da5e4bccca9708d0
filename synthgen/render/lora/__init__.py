"""LoRA files as they exist, fused with the alpha they were trained with.

`layout` reads a file's key layout, pairs and stated alpha from its safetensors header;
`base_modules` lists the base model's layers (from configs, torch-free, or the loaded model);
`fit` decides which pairs land and with which alpha; `apply` loads and fuses them through diffusers.
Only `apply` imports torch: `synthgen validate` uses the other three.
"""
