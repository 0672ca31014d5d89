"""The benchmark tables shown in the READMEs are the ones their scripts build from the committed
cell files (no number typed in by hand, none left stale after new cells land)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    path = ROOT / "benchmarks" / name / "table.py"
    spec = importlib.util.spec_from_file_location(f"table_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_vs_zoo_tables_match_the_cells() -> None:
    mod = _script("default_vs_zoo")
    text = mod.render(mod.HERE)
    assert text.rstrip() in (mod.HERE / "README.md").read_text(), (
        "run benchmarks/default_vs_zoo/table.py --write"
    )
    assert mod.error_table(text) in (ROOT / "README.md").read_text(), (
        "run benchmarks/default_vs_zoo/table.py --write"
    )


def test_archs_tables_match_the_cells() -> None:
    mod = _script("archs")
    res = mod.load([*mod.BN_DIRS, mod.HERE])
    text = mod.render(res)
    assert "cifar10_resnet26_gn" in mod.models(res)
    assert text.rstrip() in (mod.HERE / "README.md").read_text(), "run benchmarks/archs/table.py --write"
    main_readme = (ROOT / "README.md").read_text()
    for model in mod.models(res):
        expected = mod.main_readme_marker(model) + mod.model_table(res, model) + "\n\n"
        assert expected in main_readme, f"README.md: {model}'s table (run benchmarks/archs/table.py --write)"


def _cell(
    d: Path, model: str | None, method: str, scenario: str, err: float, restores: int = 0, **kw
) -> None:
    cell = {
        "dataset": "cifar10", "batch_size": 200, "severity": 5, "n_per_domain": None, "overrides": [],
        "model": model, "model_path": None, "subset": None, "method": method, "scenario": scenario,
        "scenario_options": [], "seed": 0, **kw,
    }  # fmt: skip
    rows = [
        {"corruption": "mean", "metric": "error", "value": err},
        {"corruption": "all", "metric": "n_restores", "value": restores},
    ]
    name = f"{model}_{method}_{scenario}_{cell['batch_size']}_{cell['seed']}_{len(cell['scenario_options'])}.json"
    (d / "cells").mkdir(parents=True, exist_ok=True)
    (d / "cells" / name).write_text(json.dumps({"cell": cell, "rows": rows}))


def test_archs_table_settings_restores_and_rankings(tmp_path) -> None:
    mod = _script("archs")
    gn, bn = tmp_path / "gn", tmp_path / "bn"
    for m, e_gn, e_bn in (("source", 29.1, 37.7), ("tent", 33.84, 24.7), ("lame", 30.0, 38.0)):
        _cell(gn, "cifar10_resnet26_gn", m, "continual", e_gn, restores=7 if m == "tent" else 0)
        _cell(bn, None, m, "continual", e_bn)
    _cell(gn, "cifar10_resnet26_gn", "tent", "correlated", 50.0, scenario_options=[["delta", "0.0"]])
    _cell(gn, "cifar10_resnet26_gn", "lame", "correlated", 12.0)  # no delta: the scenario's default, 0.1
    # not the protocol: other batch size, other seed, a method override -> ignored
    _cell(gn, "cifar10_resnet26_gn", "sar", "continual", 1.0, batch_size=16)
    _cell(gn, "cifar10_resnet26_gn", "sar", "continual", 1.0, seed=1)
    _cell(gn, "cifar10_resnet26_gn", "eata", "continual", 1.0, overrides=[["lr", "0.1"]])
    res = mod.load([bn, gn])
    assert res[("cifar10_resnet26_gn", "correlated δ=0.1", "lame")] == (12.0, 0)
    assert res[("cifar10_resnet26_gn", "sorted by label (δ=0)", "tent")] == (50.0, 0)
    assert not any(k[2] in ("sar", "eata") for k in res)
    table = mod.model_table(res, "cifar10_resnet26_gn")
    assert "| tent | 33.8 [7] | · | 50.0 | 24.7 |" in table  # GN settings that ran, then the BN model's
    assert "mixed_domains |" not in table.splitlines()[0].split("BN model")[0]  # no GN column without cells
    ranks = mod.ranking_table(res, "cifar10_resnet26_gn")
    assert (
        "| continual | 3 | -0.50 | tent 24.7, source 37.7, lame 38.0 | source 29.1, lame 30.0, tent 33.8 |"
        in ranks
    )
    assert mod.load([tmp_path / "none"]) == {} and mod.render({}) == ""


def test_archs_table_memo_subset_rows_stand_apart(tmp_path) -> None:
    """MEMO's one subset cell (continual, 500 images per corruption) and the source's on the same
    images are rows of their own, shown as the same experiment in every column and left out of the
    rankings; a subset of another size is not the protocol."""
    mod = _script("archs")
    gn_model = "cifar10_resnet26_gn"
    gn, bn, sub_gn, sub_bn = (tmp_path / n for n in ("gn", "bn", "sub_gn", "sub_bn"))
    for m, e_gn, e_bn in (("source", 29.1, 37.7), ("tent", 35.2, 24.7), ("lame", 30.0, 38.8)):
        _cell(gn, gn_model, m, "continual", e_gn)
        _cell(bn, None, m, "continual", e_bn)
    n = mod.MEMO_SUBSET
    for m, e_gn, e_bn in (("memo", 27.0, 30.7), ("source", 29.3, 37.5)):
        _cell(sub_gn, gn_model, m, "continual", e_gn, n_per_domain=n)
        _cell(sub_bn, None, m, "continual", e_bn, n_per_domain=n)
    _cell(tmp_path / "other", gn_model, "shot", "continual", 1.0, n_per_domain=n // 5)
    _cell(tmp_path / "other", gn_model, "tent", "mixed_domains", 1.0, n_per_domain=n)
    res = mod.load([bn, sub_bn, gn, sub_gn, tmp_path / "other"])
    tag = mod.SUBSET_TAG
    assert tag == f" ({15 * n:,} images)"
    assert res[(gn_model, "continual", "memo" + tag)] == (27.0, 0)
    assert res[(gn_model, "continual", "source")] == (29.1, 0), "the full-set source cell is kept apart"
    assert not any(k[2] == "shot" or k[1] == "mixed_domains" for k in res)
    lines = mod.model_table(res, gn_model).splitlines()
    assert lines[-2:] == [
        f"| source{tag} | 29.3 | 37.5 | = continual | = continual |",
        f"| memo{tag} | 27.0 | 30.7 | = continual | = continual |",
    ]
    ranks = mod.ranking_table(res, gn_model)
    assert "| continual | 3 |" in ranks and "memo" not in ranks


def test_archs_cross_table_is_error_minus_the_source_per_model(tmp_path) -> None:
    """The every-model table shows each method's error minus the source's on the same model and
    setting, `·` where a cell (or its source) is missing, and counts its wins over the source per
    model; the GN-vs-LN ranking compares the two non-BN models over the methods both ran."""
    mod = _script("archs")
    gn, vit, bn = "cifar10_resnet26_gn", "cifar10_vit", None
    errs = {  # model -> method -> continual error
        bn: {"source": 37.7, "tent": 24.7, "lame": 38.8, "sar": 24.9},
        gn: {"source": 29.1, "tent": 35.2, "lame": 30.0, "sar": 31.0},
        vit: {"source": 40.3, "tent": 39.0, "lame": 41.0, "sar": 38.0},
    }
    for model, row in errs.items():
        for m, e in row.items():
            _cell(tmp_path, model, m, "continual", e)
    _cell(tmp_path, gn, "tent", "mixed_domains", 38.8)  # no GN source cell there: shown as `·`
    _cell(tmp_path, gn, "t3a", "continual", 29.1 - 0.004)  # rounds to no difference: not a win
    res = mod.load([tmp_path])
    assert mod.models(res) == [gn, vit]
    table = mod.cross_table(res).splitlines()
    assert table[0].startswith(
        "| method | continual: BN | continual: GN | continual: LN | mixed_domains: BN |"
    )
    assert table[0].endswith("| beats the source |")
    tent = next(line for line in table if line.startswith("| tent |"))
    assert tent.startswith("| tent | -13.0 | +6.1 | -1.3 | · | · | · |"), tent
    assert tent.endswith("| BN 1/1, GN 0/1, LN 1/1 |"), tent
    assert not any(line.startswith("| source |") for line in table)
    t3a = next(line for line in table if line.startswith("| t3a |"))
    assert t3a.startswith("| t3a | · | +0.0 | · |") and t3a.endswith("| GN 0/1 |"), t3a
    ranks = mod.ranking_table(res, vit, gn)
    assert "Spearman ρ (cifar10_resnet26_gn vs cifar10_vit)" in ranks
    assert "| continual | 4 | -0.60 |" in ranks, ranks  # ranks 2,3,1,4 vs 4,1,3,2: 1 - 6*16/60
    text = mod.render(res)
    assert f"### {vit}: rankings against the {gn}" in text and mod.CROSS_TITLE in text
