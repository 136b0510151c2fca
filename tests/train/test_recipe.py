"""The recipes that ship with orionlm: package data in the wheel, listed by `orionlm recipes`, named as recipe:NAME
wherever a recipe file goes, and shown resolved by `orionlm train RECIPE --print-config`."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from orionlm.cli import main
from orionlm.train.recipe import RECIPES_DIR, load_recipe, shipped_recipes

REPO = Path(__file__).resolve().parents[2]
TRAINING = [name for name in shipped_recipes() if name != "moe-merge"]  # moe-merge.yaml is a moe-merge config


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `orionlm ARGS` run in this process."""
    try:
        main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_the_wheel_carries_the_recipes(tmp_path):
    """A wheel built from the project holds every recipe where recipe:NAME looks for it: inside the package, so a
    pip install has them without a checkout's files."""
    pytest.importorskip("setuptools")  # the build backend, used without build isolation (no network)
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "orionlm", source / "orionlm", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
             "-w", str(tmp_path / "dist")]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("orionlm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name for name in archive.namelist() if name.startswith("orionlm/recipes/"))
    assert RECIPES_DIR == REPO / "orionlm" / "recipes"
    assert shipped == [f"orionlm/recipes/{name}.yaml" for name in shipped_recipes()]
    assert "orionlm/recipes/sft-lora.yaml" in shipped


def test_recipes_lists_each_with_its_verb_and_description(capsys):
    status, out, _ = run_cli(capsys, "recipes")
    assert status == 0
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in out.splitlines()}
    assert list(rows) == list(shipped_recipes())
    assert rows["tinyshakespeare-moe"] == ["train", "A small MoE (8 experts, top-2) on tiny Shakespeare: minutes on a "
                                           "laptop CPU."]  # fmt: skip
    assert {name: verb for name, (verb, _) in rows.items()} == {name: "train" for name in TRAINING} | {
        "moe-merge": "moe-merge"
    }
    for name, (_, description) in rows.items():
        # the description is the recipe's first comment line: one sentence that fits a terminal beside the name
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# {description}" and description.endswith(".") and len(description) <= 100, name


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_recipe_loads_by_name_and_prints_back_to_itself(tmp_path, capsys, name):
    """recipe:NAME is the shipped file; --print-config writes the recipe after the overrides, every default included,
    as YAML that loads back to the same recipe; nothing is trained."""
    recipe = load_recipe(f"recipe:{name}")
    assert recipe == load_recipe(RECIPES_DIR / f"{name}.yaml")
    assert recipe.optim.lr > 0
    if recipe.model.path is None:  # a fine-tuning recipe's model comes with its weights
        assert recipe.model.build().vocab_size > 0

    overrides = ["--optim.lr=0.0025", "--run.out_dir", str(tmp_path / "run")]
    status, out, err = run_cli(capsys, "train", f"recipe:{name}", *overrides, "--print-config")
    assert status == 0 and not err
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_recipe(tmp_path / "printed.yaml")
    assert printed == load_recipe(f"recipe:{name}", overrides)
    assert printed.optim.lr == 0.0025 and printed.run.out_dir == str(tmp_path / "run")
    assert "schedule:" in out and "warmup_steps:" in out  # defaults the recipe leaves out are written
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("recipe:sft-lor", "no recipe 'sft-lor' (did you mean 'sft-lora'?) ships with orionlm; the recipes: "
         + ", ".join(shipped_recipes()) + " (orionlm recipes describes them)"),
        ("configs/sft-lora.yaml", "recipe configs/sft-lora.yaml does not exist; orionlm ships one as recipe:sft-lora"),
    ],
)  # fmt: skip
def test_an_unknown_recipe_is_one_line_naming_the_shipped_ones(capsys, recipe, message):
    status, out, err = run_cli(capsys, "train", recipe, "--print-config")
    assert status == 2 and not out
    assert err == f"orionlm: error: {message}\n"
