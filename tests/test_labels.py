"""Label distributions: what `sample` draws matches what the recipe declares.

Every statistical check compares with the exact value and allows 5 standard errors, so a failure
means the sampler is wrong, not unlucky (and the seeds are fixed, so a pass stays a pass).
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
import yaml
from conftest import ROOT, sample_in_background, sample_lines
from pydantic import TypeAdapter, ValidationError

from synthgen.recipe.conditional import LabelSpec
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.labels import Multilabel

N_DRAWS = 10_000
Z = 5.0  # allowed distance from the exact value, in standard errors
STD_NORMAL = NormalDist()

label_spec = TypeAdapter(LabelSpec).validate_python


# --- exact values ----------------------------------------------------------------------------


def truncnorm_moments(mean: float, std: float, low: float, high: float) -> tuple[float, float]:
    """Mean and variance of a normal truncated to [low, high] (closed form)."""
    a, b = (low - mean) / std, (high - mean) / std
    pdf_a, pdf_b = STD_NORMAL.pdf(a), STD_NORMAL.pdf(b)
    mass = STD_NORMAL.cdf(b) - STD_NORMAL.cdf(a)
    a_pdf_a = a * pdf_a if math.isfinite(a) else 0.0
    b_pdf_b = b * pdf_b if math.isfinite(b) else 0.0
    shift = (pdf_a - pdf_b) / mass
    variance = std**2 * (1 + (a_pdf_a - b_pdf_b) / mass - shift**2)
    return mean + std * shift, variance


def rounded_truncnorm_pmf(mean: float, std: float, low: float, high: float) -> dict[int, float]:
    """P(k) of an int label: the normal's mass on [k - 1/2, k + 1/2], renormalised over the
    integers in [low, high]. This is what truncation (not clipping) means for integers."""
    first = math.ceil(low) if math.isfinite(low) else math.floor(mean - 15 * std)
    last = math.floor(high) if math.isfinite(high) else math.ceil(mean + 15 * std)
    dist = NormalDist(mean, std)
    mass = {k: dist.cdf(k + 0.5) - dist.cdf(k - 0.5) for k in range(first, last + 1)}
    total = sum(mass.values())
    return {k: m / total for k, m in mass.items()}


def pmf_moments(pmf: dict[int, float]) -> tuple[float, float]:
    mean = sum(k * p for k, p in pmf.items())
    return mean, sum((k - mean) ** 2 * p for k, p in pmf.items())


def multilabel_rates(probs: dict[str, float], max_labels: int | None) -> tuple[dict, float]:
    """Exact per-finding rates and P(no finding): independent draws, then a uniformly chosen
    subset of `max_labels` when more were drawn. Enumerates every outcome (few findings)."""
    names = list(probs)
    rates, nothing = dict.fromkeys(names, 0.0), 0.0
    for hits in itertools.product((False, True), repeat=len(names)):
        p = math.prod(probs[n] if hit else 1 - probs[n] for n, hit in zip(names, hits))
        drawn = sum(hits)
        nothing += p if drawn == 0 else 0.0
        keep = 1.0 if max_labels is None or drawn <= max_labels else max_labels / drawn
        for name, hit in zip(names, hits):
            rates[name] += p * keep if hit else 0.0
    return rates, nothing


# --- tolerance checks ------------------------------------------------------------------------


def assert_share(hits: int, n: int, p: float, what: str) -> None:
    se = math.sqrt(p * (1 - p) / n)
    observed = hits / n
    assert abs(observed - p) <= Z * se + 1e-12, (
        f"{what}: observed share {observed:.4f}, expected {p:.4f} (±{Z * se:.4f}, {Z:g} SE)"
    )


def assert_mean(draws: np.ndarray, mean: float, variance: float, what: str) -> None:
    se = math.sqrt(variance / len(draws))
    assert abs(draws.mean() - mean) <= Z * se, (
        f"{what}: mean {draws.mean():.4f}, expected {mean:.4f} (±{Z * se:.4f})"
    )


def assert_variance(draws: np.ndarray, variance: float, what: str) -> None:
    # SE of the sample variance: sqrt((mu4 - sigma^4) / n), mu4 estimated from the draws
    centred = draws - draws.mean()
    m2, m4 = np.mean(centred**2), np.mean(centred**4)
    se = math.sqrt(max(m4 - m2**2, 0.0) / len(draws))
    assert abs(draws.var() - variance) <= Z * se, (
        f"{what}: variance {draws.var():.4f}, expected {variance:.4f} (±{Z * se:.4f}); "
        f"std {draws.std():.4f} vs {math.sqrt(variance):.4f}"
    )


def draw(spec, n: int = N_DRAWS, seed: int = 1234) -> list:
    rng = np.random.default_rng(seed)
    return [spec.sample(rng) for _ in range(n)]


# --- categorical -----------------------------------------------------------------------------


def test_categorical_frequencies_follow_the_normalised_weights():
    spec = label_spec({"dist": "categorical", "values": {"a": 1, "b": 2, "c": 7}})
    draws = draw(spec)
    assert set(draws) == {"a", "b", "c"}
    for value, p in {"a": 0.1, "b": 0.2, "c": 0.7}.items():
        assert_share(draws.count(value), len(draws), p, f"categorical '{value}'")


# --- normal ----------------------------------------------------------------------------------

FLOAT_NORMALS = {
    "two-sided": {"mean": 52, "std": 11, "min": 40, "max": 75},
    "lower only": {"mean": 6.0, "std": 1.5, "min": 5.0},
    "upper only": {"mean": 120, "std": 15, "max": 110},
    "far tail": {"mean": 0, "std": 1, "min": 3},
    "untruncated": {"mean": -4, "std": 0.5},
}


@pytest.mark.parametrize("params", FLOAT_NORMALS.values(), ids=FLOAT_NORMALS.keys())
def test_float_normal_matches_the_truncated_normal(params):
    spec = label_spec({"dist": "normal", **params})
    draws = np.array(draw(spec))
    low, high = params.get("min", -math.inf), params.get("max", math.inf)
    assert all(isinstance(x, float) for x in draws.tolist())
    assert draws.min() >= low and draws.max() <= high, "a draw left [min, max]"
    mean, variance = truncnorm_moments(params["mean"], params["std"], low, high)
    assert_mean(draws, mean, variance, "truncated normal")
    assert_variance(draws, variance, "truncated normal")
    # Clipping would put mass exactly on a bound; truncation spreads it over the interval.
    dist, std = NormalDist(params["mean"], params["std"]), params["std"]
    mass = dist.cdf(high) - dist.cdf(low)
    for bound, edge in ((low, (low, low + 0.1 * std)), (high, (high - 0.1 * std, high))):
        if not math.isfinite(bound):
            continue
        assert not np.any(draws == bound), f"draws pile up on the bound {bound}"
        inside = int(np.sum((draws >= edge[0]) & (draws <= edge[1])))
        p = (dist.cdf(edge[1]) - dist.cdf(edge[0])) / mass
        assert_share(inside, len(draws), p, f"share within 0.1 std of the bound {bound}")


INT_NORMALS = {
    "two-sided": {"mean": 52, "std": 11, "min": 40, "max": 75},
    "lower only": {"mean": 3, "std": 2, "min": 2},
    "upper only": {"mean": 27, "std": 5, "max": 30},
    "fractional bounds": {"mean": 10, "std": 4, "min": 7.5, "max": 12.2},
    "mean outside": {"mean": 0, "std": 3, "min": 2, "max": 9},
}


@pytest.mark.parametrize("params", INT_NORMALS.values(), ids=INT_NORMALS.keys())
def test_int_normal_matches_the_truncated_pmf(params):
    spec = label_spec({"dist": "normal", "dtype": "int", **params})
    draws = draw(spec)
    assert all(type(x) is int for x in draws)
    low, high = params.get("min", -math.inf), params.get("max", math.inf)
    assert low <= min(draws) and max(draws) <= high, "a draw left [min, max]"
    pmf = rounded_truncnorm_pmf(params["mean"], params["std"], low, high)
    # The share at each int bound is the pmf there, not the whole clipped tail.
    for bound in (low, high):
        if math.isfinite(bound):
            bound = math.ceil(bound) if bound == low else math.floor(bound)
            assert_share(draws.count(bound), len(draws), pmf[bound], f"P(value = {bound})")
    mean, variance = pmf_moments(pmf)
    values = np.array(draws, dtype=float)
    assert_mean(values, mean, variance, "int normal")
    assert_variance(values, variance, "int normal")


def test_int_normal_without_an_integer_in_bounds_is_refused_or_stays_in_bounds():
    params = {"dist": "normal", "dtype": "int", "mean": 2.5, "std": 1, "min": 2.2, "max": 2.8}
    try:
        spec = label_spec(params)
    except ValidationError:
        return
    assert all(2.2 <= x <= 2.8 for x in draw(spec, n=50))


# --- uniform ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(0, 4), (-3, 3), (1.5, 4.5), (7, 7)])
def test_int_uniform_gives_every_integer_in_range_equally(low, high):
    spec = label_spec({"dist": "uniform", "dtype": "int", "min": low, "max": high})
    draws = draw(spec)
    assert all(type(x) is int for x in draws)
    support = range(math.ceil(low), math.floor(high) + 1)
    assert set(draws) == set(support), "both ends are included, nothing outside"
    for k in support:
        assert_share(draws.count(k), len(draws), 1 / len(support), f"P(value = {k})")


def test_int_uniform_without_an_integer_in_range_is_refused():
    with pytest.raises(ValidationError):
        label_spec({"dist": "uniform", "dtype": "int", "min": 2.2, "max": 2.8})


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-250.0, 10.0)])
def test_float_uniform_stays_in_range_with_the_right_moments(low, high):
    spec = label_spec({"dist": "uniform", "min": low, "max": high})
    draws = np.array(draw(spec))
    assert draws.min() >= low and draws.max() <= high
    variance = (high - low) ** 2 / 12
    assert_mean(draws, (low + high) / 2, variance, "uniform")
    assert_variance(draws, variance, "uniform")
    # each tenth of the range holds a tenth of the draws
    counts, _ = np.histogram(draws, bins=10, range=(low, high))
    for i, count in enumerate(counts):
        assert_share(int(count), len(draws), 0.1, f"uniform decile {i}")


# --- constant --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, 2.5, "clinic-a"])
def test_constant_is_always_its_value(value):
    spec = label_spec({"dist": "constant", "value": value})
    draws = draw(spec, n=100)
    assert draws == [value] * 100
    assert {type(x) for x in draws} == {type(value)}


# --- multilabel ------------------------------------------------------------------------------

FINDINGS = {"atelectasis": 0.3, "effusion": 0.45, "cardiomegaly": 0.2, "nodule": 0.6}


@pytest.mark.parametrize("max_labels", [None, 1, 2])
def test_multilabel_rates_none_share_and_cap(max_labels):
    spec = label_spec({"dist": "multilabel", "values": FINDINGS, "max_labels": max_labels})
    draws = draw(spec)
    order = list(FINDINGS)
    for drawn in draws:
        assert len(drawn) == len(set(drawn)) and set(drawn) <= set(FINDINGS)
        assert drawn == sorted(drawn, key=order.index), "findings keep the declared order"
        if max_labels is not None:
            assert len(drawn) <= max_labels
    rates, nothing = multilabel_rates(FINDINGS, max_labels)
    for finding, p in rates.items():
        hits = sum(finding in drawn for drawn in draws)
        assert_share(hits, len(draws), p, f"rate of '{finding}' (max_labels={max_labels})")
    assert_share(sum(not d for d in draws), len(draws), nothing, "share with no finding")


def test_multilabel_text_uses_join_and_the_none_value():
    spec = label_spec(
        {"dist": "multilabel", "values": FINDINGS, "none": "normal study", "join": " and "}
    )
    assert spec.as_text([]) == "normal study"
    assert spec.as_text(["atelectasis"]) == "atelectasis"
    assert spec.as_text(["atelectasis", "effusion"]) == "atelectasis and effusion"
    assert Multilabel(dist="multilabel", values=FINDINGS).as_text(["a", "b"]) == "a, b"


def test_multilabel_probability_one_is_always_drawn():
    spec = label_spec({"dist": "multilabel", "values": {"always": 1.0, "never-ish": 1e-9}})
    assert all(d == ["always"] for d in draw(spec, n=500))


# --- several labels from one Generator -------------------------------------------------------


def test_sample_labels_draws_every_label_in_declaration_order():
    specs = {
        "b": label_spec({"dist": "uniform", "min": 0, "max": 1}),
        "a": label_spec({"dist": "categorical", "values": {"x": 1, "y": 1}}),
    }
    model = LabelModel(specs)
    first = model.draw(np.random.default_rng(5))
    assert list(first) == ["b", "a"] and model.order == ["b", "a"]
    assert first == model.draw(np.random.default_rng(5))
    rng = np.random.default_rng(5)  # the same draws, one label after the other
    assert first == {name: spec.sample(rng) for name, spec in specs.items()}


# --- the real CLI: `synthgen sample` ---------------------------------------------------------

CLI_TEMPLATE = (
    "chest x-ray {view} view, age {age}, bmi {bmi}, hba1c {hba1c:.1f}, grade {grade}, "
    "exposure {exposure}, at {site}, demonstrating {findings}"
)
CLI_LABELS = {
    "view": {"dist": "categorical", "values": {"PA": 3, "AP": 1, "lateral": 1}},
    "age": {"dist": "normal", "mean": 52, "std": 11, "min": 40, "max": 75, "dtype": "int"},
    "bmi": {"dist": "normal", "mean": 27, "std": 5, "max": 30, "dtype": "int"},
    "hba1c": {"dist": "normal", "mean": 6.0, "std": 1.5, "min": 5.0},
    "grade": {"dist": "uniform", "min": 0, "max": 4, "dtype": "int"},
    "exposure": {"dist": "uniform", "min": 0.5, "max": 2.0},
    "site": {"dist": "constant", "value": "clinic-a"},
    "findings": {
        "dist": "multilabel",
        "values": {"atelectasis": 0.3, "effusion": 0.4, "cardiomegaly": 0.2},
        "max_labels": 2,
        "none": "no finding",
    },
}
CLI_N = 3000


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """`synthgen sample -n 3000`, started before the module's first test so it runs alongside."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe.update(name="marginals", seed=7, num_samples=CLI_N, prompt=CLI_TEMPLATE)
    recipe["labels"] = CLI_LABELS
    path = tmp_path_factory.mktemp("marginals") / "marginals.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with sample_in_background(str(path), "-n", str(CLI_N)) as proc:
        yield proc


@pytest.fixture(scope="module")
def cli_lines(cli_run) -> list[dict]:
    # the tiny model's tokenizer reads a byte per token: this long template can pass its 75
    return sample_lines(cli_run, warning="warning: prompt: can be 126 tokens, but the text encoder")


def column(lines: list[dict], name: str) -> list:
    return [line["labels"][name] for line in lines]


def test_cli_sample_prints_one_json_line_per_sample(cli_lines):
    assert len(cli_lines) == CLI_N
    for index, line in enumerate(cli_lines):
        assert set(line) == {"index", "key", "split", "labels", "prompt"}
        assert line["index"] == index and line["key"] == f"marginals-{index:08d}"
        assert list(line["labels"]) == list(CLI_LABELS)


def test_cli_categorical_and_constant(cli_lines):
    views = column(cli_lines, "view")
    for value, p in {"PA": 0.6, "AP": 0.2, "lateral": 0.2}.items():
        assert_share(views.count(value), CLI_N, p, f"view '{value}'")
    assert set(column(cli_lines, "site")) == {"clinic-a"}


def test_cli_int_normals_stay_in_bounds_without_pile_up(cli_lines):
    for name, low, high in (("age", 40, 75), ("bmi", -math.inf, 30)):
        params = CLI_LABELS[name]
        values = column(cli_lines, name)
        assert all(type(v) is int and low <= v <= high for v in values), name
        pmf = rounded_truncnorm_pmf(params["mean"], params["std"], low, high)
        for bound in (low, high):
            if math.isfinite(bound):
                assert_share(values.count(bound), CLI_N, pmf[bound], f"P({name} = {bound})")
        mean, variance = pmf_moments(pmf)
        assert_mean(np.array(values, dtype=float), mean, variance, name)
        assert_variance(np.array(values, dtype=float), variance, name)


def test_cli_float_normal_one_sided(cli_lines):
    values = np.array(column(cli_lines, "hba1c"))
    assert values.min() >= 5.0
    mean, variance = truncnorm_moments(6.0, 1.5, 5.0, math.inf)
    assert_mean(values, mean, variance, "hba1c")
    assert_variance(values, variance, "hba1c")


def test_cli_uniforms(cli_lines):
    grades = column(cli_lines, "grade")
    assert set(grades) == {0, 1, 2, 3, 4} and all(type(g) is int for g in grades)
    for k in range(5):
        assert_share(grades.count(k), CLI_N, 0.2, f"P(grade = {k})")
    exposure = np.array(column(cli_lines, "exposure"))
    assert exposure.min() >= 0.5 and exposure.max() <= 2.0
    assert_mean(exposure, 1.25, 1.5**2 / 12, "exposure")


def test_cli_multilabel_rates_cap_and_prompt(cli_lines):
    spec = CLI_LABELS["findings"]
    findings = column(cli_lines, "findings")
    assert all(len(drawn) <= 2 for drawn in findings)
    rates, nothing = multilabel_rates(spec["values"], spec["max_labels"])
    for finding, p in rates.items():
        hits = sum(finding in drawn for drawn in findings)
        assert_share(hits, CLI_N, p, f"rate of '{finding}'")
    assert_share(sum(not d for d in findings), CLI_N, nothing, "share with no finding")
    pairs = [
        line for line in cli_lines if line["labels"]["findings"] == ["atelectasis", "effusion"]
    ]
    assert pairs, "some sample draws both atelectasis and effusion"
    assert all(line["prompt"].endswith("demonstrating atelectasis, effusion") for line in pairs)
    for line in cli_lines:
        labels = line["labels"]
        shown = ", ".join(labels["findings"]) or "no finding"
        assert line["prompt"] == CLI_TEMPLATE.format_map({**labels, "findings": shown})
