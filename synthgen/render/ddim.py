"""DDIM without host syncs: the schedule is read on the device, so the GPU queue never drains.

diffusers' `DDIMScheduler.step` indexes a CPU table with the CUDA timestep and branches in Python
on `prev_timestep >= 0`: each is a device-to-host read that waits for every queued kernel, twice a
step. Here both are device ops (a gather and `torch.where`); the arithmetic is otherwise the same,
operation for operation, so on CPU the samples are bit-identical to diffusers'.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput


class SyncFreeDDIMScheduler(DDIMScheduler):
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        super().set_timesteps(num_inference_steps, device)
        self._alphas = self.alphas_cumprod.to(self.timesteps.device)
        self._final_alpha = self.final_alpha_cumprod.to(self.timesteps.device)

    def _alpha_at(self, timestep: torch.Tensor) -> torch.Tensor:
        # `table[t]` with a 0-d tensor goes through int(t), a host read; a gather does not.
        return self._alphas.gather(0, timestep.reshape(1)).reshape(())

    def _runs_on_device(self, eta: float, use_clipped_model_output: bool) -> bool:
        """The deterministic epsilon case SD-1.x uses; anything else takes diffusers' path."""
        config = self.config
        return (
            eta == 0
            and not use_clipped_model_output
            and not config.thresholding
            and config.prediction_type == "epsilon"
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        if not self._runs_on_device(eta, use_clipped_model_output):
            return super().step(
                model_output, timestep, sample, eta, use_clipped_model_output, generator,
                variance_noise, return_dict,
            )  # fmt: skip
        timestep = torch.as_tensor(timestep, device=self._alphas.device)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self._alpha_at(timestep)
        alpha_prod_t_prev = torch.where(
            prev_timestep >= 0, self._alpha_at(prev_timestep.clamp(min=0)), self._final_alpha
        )
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (
            0.5
        )
        if self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )
        # diffusers subtracts eta's variance term too; with eta 0 it is an exact 0.0
        pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * model_output
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample
        )
