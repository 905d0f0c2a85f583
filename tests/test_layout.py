"""The house rules, checked on the source: one registry spells storage paths, layers import in one direction,
asset modules stand side by side, no import cycle, the environment is read in `resources/` only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.registry import LAYOUT, TABLES
from tda_assets.io.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tda_assets", "resources")
KEY_FRAGMENTS = (
    "query_id=",
    "config_id=",
    "shard=",
    "checkpoint_id=",
    "protocol_id=",
    "encoder_id=",
    "method=",
    "part-0.parquet",
    "part-*.parquet",
    ".safetensors",
)
REGISTRY = "tda_assets.io.registry"
PLAIN_LAYERS = ("tda_assets.attribution", "tda_assets.models", "tda_assets.data", "tda_assets.io", "resources.env")
# the AWS SDK's and the hub's own variables where their clients are made; a write (setdefault) is not a read
ENV_READERS = {"resources.env", "tda_assets.io.storage", "tda_assets.models.embedded.text"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = (ROOT / Path(*package) / "__init__.py").is_file()
    base = package if is_package else package[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, tree: ast.Module, top_level_only: bool) -> set[str]:
    """Modules imported by `module` (every import, or only those run when it is imported)."""
    found: set[str] = set()
    body = tree.body if top_level_only else list(ast.walk(tree))
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def strings(tree: ast.Module) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_module_but_the_registry_spells_a_storage_key():
    offenders = {
        name: [f for f in KEY_FRAGMENTS if any(f in s for s in strings(tree))]
        for name, tree in modules().items()
        if name != REGISTRY
    }
    assert {n: f for n, f in offenders.items() if f} == {}


def test_views_read_tables_only_through_the_registry():
    views = (ROOT / "sql" / "views.sql").read_text()
    assert "read_parquet" not in views and "{root}" not in views
    assert set(re.findall(r"\{table:(\w+)\}", views)) == set(TABLES)  # every table has a view, every view a table


def test_no_import_cycle_at_module_level():
    mods = modules()
    graph = {m: {i for i in imports(m, t, top_level_only=True) if i in mods and i != m} for m, t in mods.items()}
    for m in list(graph):  # importing a.b.c runs a and a.b first
        parts = m.split(".")
        graph[m] |= {".".join(parts[:i]) for i in range(1, len(parts))} & set(mods) - {m}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend(stack[stack.index(n) :] + [m, n] if n in stack else [m, n])
                return True
            if n not in state and visit(n, stack + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), " → ".join(cycle)


def test_asset_modules_never_import_each_other():
    mods = modules()
    assets = [m for m in mods if m.startswith("tda_assets.defs.assets.")]
    assert len(assets) >= 5
    for m in assets:
        assert not {i for i in imports(m, mods[m], top_level_only=False) if i.startswith("tda_assets.defs.assets.")}, m


def test_the_engine_and_storage_layers_import_no_dagster():
    for m, tree in modules().items():
        if m.startswith(PLAIN_LAYERS):
            assert not {i for i in imports(m, tree, top_level_only=False) if i.split(".")[0].startswith("dagster")}, m


def test_lower_layers_never_import_the_orchestration():
    for m, tree in modules().items():
        if m.startswith(PLAIN_LAYERS):
            upward = {
                i
                for i in imports(m, tree, top_level_only=False)
                if i.startswith(
                    ("tda_assets.defs", "tda_assets.experiments", "tda_assets.definitions", "tda_assets.cli")
                )
                or (i.startswith("resources") and not i.startswith("resources.env"))
            }
            assert not upward, (m, upward)


def test_the_environment_is_read_in_resources_only():
    readers = set()
    for m, tree in modules().items():
        text = ast.unparse(tree)
        if re.search(r"os\.environ(?!\.setdefault)|os\.getenv", text):
            readers.add(m)
    assert readers - ENV_READERS - {m for m in readers if m.startswith("resources.")} == set()


def test_unlearning_configs_columns_are_the_engine_settings_fields():
    from dataclasses import fields

    from tda_assets.attribution.settings import UnlearningSettings
    from tda_assets.defs.configs import UnlearningConfig

    names = [f.name for f in fields(UnlearningSettings)]
    assert list(UnlearningConfig.model_fields) == ["config_id", *names]
    assert list(TABLES["unlearning_configs"].columns) == [
        f.metadata.get("column", f.name) for f in fields(UnlearningSettings)
    ]


def test_training_gradients_config_fields_are_the_gradient_spec_with_the_default_configurations_values():
    from dataclasses import fields

    from tda_assets.attribution.gradients import GradientSpec
    from tda_assets.attribution.settings import UnlearningSettings
    from tda_assets.defs.assets.gradients import TrainingGradientsConfig

    names = [f.name for f in fields(GradientSpec)]
    assert list(TrainingGradientsConfig.model_fields) == ["items_per_pass", *names]
    assert TrainingGradientsConfig().spec() == GradientSpec.for_settings(UnlearningSettings())
    assert TrainingGradientsConfig(k=64, damping=0.5).spec() == GradientSpec(k=64, damping=0.5)


@pytest.mark.parametrize(
    "view, keys",
    [
        ("training_items", ["item_id", "audio_uri", "caption", "artist", "duration_s", "shard"]),
        ("baseline_losses", ["checkpoint_id", "protocol_id", "item_id", "draw", "t", "loss"]),
        ("queries", ["query_id", "prompt", "seed", "audio_uri", "target_artist"]),
        ("unlearning_configs", ["config_id", "recipe", "lr", "steps", "lambda", "param_subset", "seed"]),
        ("unlearning_runs", ["query_id", "config_id", "query_loss_before", "query_loss_after", "delta_uri"]),
        (
            "attributions",
            ["query_id", "config_id", "method", "item_id", "score", "rank", "checkpoint_id", "protocol_id"],
        ),
        ("consistency", ["query_id", "left", "right", "metric", "k", "value"]),
    ],
)
def test_every_view_has_the_key_columns_of_the_design(tmp_path, view, keys):
    columns = QueryEngine(Storage(str(tmp_path))).sql(f"SELECT * FROM {view}").columns
    assert [c for c in columns if c in keys] == keys


def test_registry_keys_parse_back_to_their_fields():
    for entry in LAYOUT.values():
        values = {f: f"v-{i}" for i, f in enumerate(entry.fields)}
        assert entry.parse(entry.key(**values)) == values, entry.name
