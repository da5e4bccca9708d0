"""Which pairs of a LoRA file land on the base model, and with which alpha. One decision, made
torch-free from configs by `synthgen validate` and again from the loaded model when it renders.

Alpha (the update is scale × alpha / rank × up @ down, rank read from the tensors):
1. the file's own alpha (diffusers' PEFT metadata, kohya `.alpha` tensors, a PEFT folder's
   adapter_config.json); a recipe `model.lora.alpha` that contradicts it is refused;
2. else the recipe's `model.lora.alpha`;
3. else alpha = rank, as diffusers does (an update of 1.0 × scale), with one warning line.

A file whose keys do not all land (a module the model lacks, a shape that does not fit, a key of
no known layout) is refused unless `model.lora.allow_partial: true`, which loads the rest and says
how many keys were dropped.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from synthgen.errors import ModelError
from synthgen.recipe.schema import LoraConfig, ModelConfig
from synthgen.render.lora.base_modules import BaseModules, Shape, modules_from_config
from synthgen.render.lora.layout import LoraFile, LoraPair, read_lora_file
from synthgen.render.model_files import local_lora_file, lora_field

RECIPE = "recipe"
ASSUMED = "assumed: alpha = rank, as diffusers does"


@dataclass(frozen=True)
class FittedPair:
    component: str
    module: str  # dotted path in the component (kohya names resolved)
    pair: LoraPair
    alpha: float
    alpha_source: str


@dataclass(frozen=True)
class LoraFit:
    file: LoraFile
    pairs: list[FittedPair]  # the pairs that land (or that could not be checked from configs)
    dropped: list[str]  # "what: why", one per pair or key that does not land
    unchecked: int  # pairs outside what the base model's configs describe
    base_source: str | None  # what the shapes were checked against; None: not checked

    @property
    def keys_total(self) -> int:
        return 2 * len(self.file.pairs) + len(self.file.unrecognised)

    @property
    def keys_dropped(self) -> int:
        return self.keys_total - 2 * len(self.pairs)

    @property
    def rank(self) -> int:
        return Counter(p.pair.rank for p in self.pairs).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        return Counter(p.alpha for p in self.pairs).most_common(1)[0][0]

    @property
    def alpha_source(self) -> str:
        return "; ".join(sorted({p.alpha_source for p in self.pairs}))

    @property
    def assumed(self) -> bool:
        return any(p.alpha_source == ASSUMED for p in self.pairs)


def _resolve(pair: LoraPair, base: BaseModules | None) -> str | None:
    """The pair's dotted module path in the base model, or None where it is not there."""
    if base is None or pair.component not in base.components:
        return pair.module if not pair.underscored else None
    modules = base.components[pair.component]
    if not pair.underscored:
        return pair.module if pair.module in modules else None
    by_underscores = {name.replace(".", "_"): name for name in modules}
    return by_underscores.get(pair.module)


def _shape_problem(pair: LoraPair, shape: Shape) -> str | None:
    out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
    want_down = (pair.rank, inp, *kernel)
    want_up = (out, pair.rank, *(1,) * len(kernel))
    if pair.down_shape == want_down and pair.up_shape == want_up:
        return None
    return f"shapes {list(pair.down_shape)} and {list(pair.up_shape)} do not fit the layer {list(shape)}"


def _alpha(pair: LoraPair, file: LoraFile, lora: LoraConfig) -> tuple[float, str]:
    stated = file.file_alpha.get((pair.component, pair.module))
    if stated is None:
        if lora.alpha is not None:
            return lora.alpha, RECIPE
        return float(pair.rank), ASSUMED
    if not (stated > 0 and math.isfinite(stated)):
        raise ModelError(f"'{file.path.name}' gives alpha {stated:g} ({file.alpha_source})",
                         where="model.lora")  # fmt: skip
    if lora.alpha is not None and not math.isclose(stated, lora.alpha, rel_tol=1e-6):
        raise ModelError(
            f"the recipe says alpha {lora.alpha:g} but '{file.path.name}' says {stated:g} "
            f"({file.alpha_source}); remove model.lora.alpha or correct it",
            where="model.lora.alpha",
        )
    return stated, f"file: {file.alpha_source}"


def fit_lora(file: LoraFile, base: BaseModules | None, lora: LoraConfig) -> LoraFit:
    """Match every pair against the base model's layers and decide its alpha."""
    fitted, dropped, unchecked = [], [], 0
    for key in file.unrecognised:
        dropped.append(f"key '{key}': not a LoRA key of a layout synthgen reads")
    for pair in file.pairs:
        alpha, source = _alpha(pair, file, lora)
        module = _resolve(pair, base)
        where = f"{pair.component}.{module or pair.module}"
        if base is None or pair.component not in base.components:
            unchecked += 1
        elif module is None:
            if base.covers(pair.component, pair.module):
                dropped.append(f"{where}: no such layer in the base model")
                continue
            unchecked += 1
        else:
            problem = _shape_problem(pair, base.components[pair.component][module])
            if problem:
                dropped.append(f"{where}: {problem}")
                continue
        fitted.append(FittedPair(pair.component, module or pair.module, pair, alpha, source))
    return LoraFit(file, fitted, dropped, unchecked, base.source if base else None)


def check_complete(fit: LoraFit, lora: LoraConfig) -> str | None:
    """Refuse a partial fit unless allowed; return the warning line for an allowed one."""
    if not fit.dropped:
        return None
    counts = f"{fit.keys_dropped} of {fit.keys_total} LoRA keys in '{fit.file.path.name}'"
    if not fit.pairs:
        raise ModelError(f"none of the {fit.keys_total} LoRA keys in '{fit.file.path.name}' "
                         f"land on the base model ({fit.dropped[0]})", where="model.lora")  # fmt: skip
    if not lora.allow_partial:
        raise ModelError(
            f"{counts} do not land on the base model ({fit.dropped[0]}); set "
            "model.lora.allow_partial: true to load the others anyway",
            where="model.lora",
        )
    return f"model.lora: {counts} do not land on the base model and are dropped ({fit.dropped[0]})"


def alpha_warning(fit: LoraFit) -> str | None:
    """One line when no one said what alpha the adapter was trained with."""
    if not fit.assumed:
        return None
    return (
        f"model.lora.alpha: '{fit.file.path.name}' does not state its alpha; using alpha = rank "
        f"({fit.rank}), an update of 1.0 × scale, as diffusers does. Set model.lora.alpha to the "
        "alpha it was trained with (the SynthMed adapters: 32)"
    )


def describe(fit: LoraFit) -> list[str]:
    """What `synthgen validate` prints about the LoRA."""
    ranks = sorted({p.pair.rank for p in fit.pairs})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (mostly {fit.rank})"
    alphas = sorted({p.alpha for p in fit.pairs})
    alpha = f"{alphas[0]:g}" if len(alphas) == 1 else f"{alphas[0]:g}–{alphas[-1]:g}"
    factor = f"update = {fit.alpha / fit.rank:g} × scale" if len(ranks) == len(alphas) == 1 else ""
    targets = []
    for component, label in (("unet", "UNet"), ("text_encoder", "text-encoder")):
        pairs = [p for p in fit.pairs if p.component == component]
        if pairs:
            leaves = ", ".join(sorted({_leaf(p) for p in pairs}))
            targets.append(f"{leaves} in {len(pairs)} {label} modules")
    if not any(p.component == "text_encoder" for p in fit.pairs):
        targets.append("no text-encoder keys")
    if fit.base_source is None:
        shapes = "shapes: not checked (the base model's configs are not available offline)"
    else:
        checked = len(fit.pairs) - fit.unchecked
        shapes = f"shapes: {checked} of {len(fit.file.pairs)} modules fit ({fit.base_source})"
        if fit.unchecked:
            shapes += f"; {fit.unchecked} outside the attention layers are checked at load time"
        if fit.dropped:
            shapes += f"; {len(fit.dropped)} do not land, e.g. {fit.dropped[0]}"
    return [
        f"layout {fit.file.layout}",
        f"rank {rank}, alpha {alpha} ({fit.alpha_source})" + (f": {factor}" if factor else ""),
        "targets " + "; ".join(targets),
        shapes,
    ]


def _leaf(fitted: FittedPair) -> str:
    """The projection a pair targets (to_q, to_out.0, q_proj, …), for a short summary."""
    sep = "_" if fitted.pair.underscored and fitted.module == fitted.pair.module else r"\."
    container = (
        rf"(?:attn\d|self_attn|mlp|attentions{sep}\d+|transformer_blocks{sep}\d+|resnets{sep}\d+)"
    )
    match = re.fullmatch(rf".*{sep}{container}{sep}(.+)", fitted.module)
    return match.group(1) if match else fitted.module.rsplit(".", 1)[-1]


def inspect_lora(config: ModelConfig) -> tuple[list[str], list[str]]:
    """What `validate` (lines) and `generate` (warnings) say about the recipe's LoRA, from its
    header and the base model's configs alone; raises the errors loading it would raise."""
    if config.lora is None:
        return [], []
    path = local_lora_file(config.lora)
    if path is None:
        return ["not inspected: the file is not downloaded yet (it is checked when it loads)"], []
    if not path.is_file():
        raise ModelError(f"LoRA file '{path.name}' not found", where=lora_field(config.lora))
    fit = fit_lora(read_lora_file(path, lora_field(config.lora)), modules_from_config(config),
                   config.lora)  # fmt: skip
    warnings = [w for w in (check_complete(fit, config.lora), alpha_warning(fit)) if w]
    return [f"{path.name}: {describe(fit)[0]}", *describe(fit)[1:]], warnings
