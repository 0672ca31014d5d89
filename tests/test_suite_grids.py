"""The grids of the `default_vs_zoo` (issue 15) and `archs` (issue 16) suites: which cells they hold."""

from __future__ import annotations

from collections import Counter

import pytest

import testtime.models.zoo as zoo
from testtime.adapt.registry import get_method, list_methods
from testtime.bench.suites import (
    ARCH_MODELS,
    DEFAULT_RECIPE,
    DEFAULT_VS_ZOO_BASELINES,
    DEFAULT_VS_ZOO_ZOO,
    MEMO_SUBSET,
    SuiteArgs,
    default_vs_zoo_columns,
    get_suite,
)


def _cells(name: str, **kw):
    suite = get_suite(name)
    return suite.build(SuiteArgs(seeds=list(kw.pop("seeds", suite.default_seeds)), **kw))


def test_default_vs_zoo_runs_the_recipe_on_every_seed_and_the_rest_once() -> None:
    cells = _cells("default_vs_zoo", data="auto")
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids)), "no cell twice"
    columns = default_vs_zoo_columns("auto")
    recipe = [c for c in cells if c.method == DEFAULT_RECIPE]
    assert Counter(c.seed for c in recipe) == {0: len(columns), 1: len(columns), 2: len(columns)}
    assert cells[: len(columns)] == [c for c in recipe if c.seed == 0], "the recipe's first seed runs first"
    others = [c for c in cells if c.method != DEFAULT_RECIPE]
    assert {c.seed for c in others} == {0}
    cifar = [c for c in cells if c.dataset == "cifar10"]
    assert {c.severity for c in cifar} == {5} and {c.data for c in cifar} == {"auto"}
    assert {c.n_per_domain for c in cifar if c.scenario != "gradual"} == {None}, "full 10k test set"
    scen = {(c.scenario, c.batch_size, c.scenario_options) for c in cells}
    assert ("correlated", 200, (("delta", "0.1"),)) in scen and ("continual", 16, ()) in scen
    assert {c.dataset for c in cells} == {"cifar10", "mnist_usps"}
    for _, setting in columns:  # every column has the baselines and the zoo rows
        col = {c.method for c in cells if all(getattr(c, k) == v for k, v in setting.items())}
        assert {DEFAULT_RECIPE, "source", "tent"} <= col
        if setting["dataset"] == "cifar10":
            assert set(DEFAULT_VS_ZOO_BASELINES + DEFAULT_VS_ZOO_ZOO) <= col


def test_default_vs_zoo_methods_option_restricts_without_duplicates() -> None:
    cells = _cells("default_vs_zoo", data="auto", methods=[DEFAULT_RECIPE])
    assert {c.method for c in cells} == {DEFAULT_RECIPE}
    assert len({c.cell_id for c in cells}) == len(cells) == 3 * len(default_vs_zoo_columns("auto"))


def test_archs_suite_has_only_methods_that_run_on_the_models_norm_kind(monkeypatch) -> None:
    gn = next(m for m, kind in ARCH_MODELS.items() if kind == "GroupNorm")
    shipped = dict(zoo.SHIPPED)
    shipped.pop("cifar10_vit", None)
    shipped.setdefault(gn, shipped["cifar10_resnet26"])
    monkeypatch.setattr(zoo, "SHIPPED", shipped)
    cells = _cells("archs", data="auto")
    assert {c.model for c in cells} == {gn}
    methods = {c.method for c in cells}
    assert {"bn", "alpha_bn", "unmix_tns"}.isdisjoint(methods), "BatchNorm-only methods refuse GN models"
    assert methods == {m for m in list_methods() if "GroupNorm" in get_method(m).norm_support.kinds}
    deltas = {dict(c.scenario_options).get("delta") for c in cells if c.scenario == "correlated"}
    assert deltas == {"0.1", "0.0"}
    order = [c.method for c in cells]
    assert order.index("cotta") > order.index("tent"), "hours-long methods run last"
    memo = [c for c in cells if c.n_per_domain is not None]  # MEMO's one subset cell, and the source's
    assert sorted(c.method for c in memo) == ["memo", "source"]
    assert {(c.scenario, c.n_per_domain) for c in memo} == {("continual", MEMO_SUBSET)}
    assert all(c.batch_size == 200 for c in cells)
    full_source = {(c.scenario, c.scenario_options) for c in cells if c.method == "source" and c not in memo}
    assert len(full_source) == 4, "the source's full-set cells stay, beside its subset cell"
    assert {c.scenario for c in cells if c.method == "memo"} == {"continual"}, "order and mix do not matter"


@pytest.mark.parametrize("shipped_vit", [False, True])
def test_archs_suite_skips_models_not_shipped(monkeypatch, shipped_vit) -> None:
    shipped = {k: v for k, v in zoo.SHIPPED.items() if k not in ARCH_MODELS}
    if shipped_vit:
        shipped["cifar10_vit"] = zoo.SHIPPED["cifar10_resnet26"]
    monkeypatch.setattr(zoo, "SHIPPED", shipped)
    cells = _cells("archs", data="auto")
    assert {c.model for c in cells} == ({"cifar10_vit"} if shipped_vit else set())
    if shipped_vit:
        assert {dict(c.scenario_options).get("delta") for c in cells if c.scenario == "correlated"} == {"0.1"}
