"""The fewest inference steps each scheduler a recipe may name can run, so a recipe that asks for
fewer is refused at validation instead of failing in every shard at render time.

Measured with diffusers 0.42 on the schedulers synthgen.render.pipeline builds (each made
`from_config` of the base model's scheduler config: the presets' SD-1.x DDIM config), through
`set_timesteps(n)` and a step loop and through the real `tiny` pipeline, t2i and i2i:

- pndm: with `skip_prk_steps` off (the presets' config) it starts with Runge-Kutta steps over
  the last 4 timesteps, and `set_timesteps(n)` for n < 4 fails with a numpy broadcast error.
  Models whose config skips them (the SD-1.x Hub configs) would run 1 to 3, but the recipe
  cannot see the model's config, so 4 holds for every model.
- ddim, euler, dpm (multistep): any n ≥ 1.

For i2i the scheduler is still set to `steps` timesteps and img2img runs int(steps × strength)
of them; one is enough for all four (GenerationConfig refuses zero).
"""

from __future__ import annotations

MIN_STEPS = {"ddim": 1, "pndm": 4, "euler": 1, "dpm": 1}
