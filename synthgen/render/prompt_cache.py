"""Text-encoder outputs per distinct prompt, computed once and kept for the rest of the run.

Label-driven prompts repeat (a categorical recipe has a few hundred distinct prompts for
millions of images), so the text encoder runs once per prompt, not once per image. New prompts
are encoded together in a batch padded to one size: an embedding then does not depend on
which prompts shared its batch, which keeps CPU runs byte-identical across shard layouts.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PromptEmbeddings:
    def __init__(self, pipe, device: str, batch_size: int, capacity: int = 4096):
        self.pipe = pipe
        self.device = device
        self.batch_size = batch_size
        self.capacity = capacity  # SD-1.x: 77 × 768 half floats, 118 KB a prompt
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # prompts sent through the text encoder (for tests and benchmarks)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """The (len(prompts), tokens, width) conditioning for `prompts`, in order."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        for start in range(0, len(missing), self.batch_size):
            self._encode(missing[start : start + self.batch_size])
        for prompt in prompts:
            self.cache.move_to_end(prompt)
        rows = [self.cache[prompt] for prompt in prompts]
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return torch.stack(rows)

    def _encode(self, prompts: list[str]) -> None:
        padded = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
        embeds = self.pipe.encode_prompt(padded, self.device, 1, False)[0]
        self.encoded += len(prompts)
        for prompt, row in zip(prompts, embeds):
            self.cache[prompt] = row.clone()  # not a view: a kept row must not pin its batch
