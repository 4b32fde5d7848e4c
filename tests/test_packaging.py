"""What `pip install` puts on a user's machine: the one `llava_lite` package, with its recipes,
question sets and demo model inside, and every subcommand behind `llava-lite`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("ask", "caption", "export-hf", "info", "bench", "zeroshot", "retrieve", "data", "eval", "serve",
               "chat", "train")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The repository built as a wheel and installed (without dependencies) into a folder."""
    wheels = tmp_path_factory.mktemp("wheels")
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: the build backend comes from this environment, not the network
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("llava_lite-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    return target


def test_the_wheel_installs_llava_lite_and_no_other_top_level_package(installed):
    top = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["llava_lite"]
    package = installed / "llava_lite"
    # every module of the source tree, and the files that live top-level in the repository
    sources = {p.relative_to(REPO / "llava_lite") for p in (REPO / "llava_lite").rglob("*.py")}
    sources |= {Path("recipes") / p.name for p in (REPO / "train" / "recipes").glob("*.py")}
    sources |= {Path("general_chat") / p.name for p in (REPO / "data" / "general_chat").iterdir() if p.is_file()}
    missing = [str(p) for p in sources if not (package / p).is_file()]
    assert not missing
    # every file of the default model ships, its domain gate included
    demo = [f.relative_to(REPO / "llava_lite") for f in (REPO / "llava_lite" / "assets" / "demo-model").rglob("*")]
    assert [str(f) for f in demo if (REPO / "llava_lite" / f).is_file() and not (package / f).is_file()] == []
    assert (package / "assets" / "demo-model" / "projector.safetensors").is_file()
    assert len((package / "assets" / "imagenet_classes.txt").read_text().splitlines()) == 1000


def test_the_installed_package_finds_its_recipes_and_question_sets(installed):
    code = ("import llava_lite, llava_lite.recipes as r, llava_lite.eval.general_chat as g; "
            "print(llava_lite.__file__); print(sorted(r.RECIPES)); print(len(g.load_questions()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=installed, capture_output=True, text=True,
                         env={"PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    file, recipes, questions = out.stdout.splitlines()
    assert file.startswith(str(installed))
    assert all(name in recipes for name in ("demo", "tiny", "clip-demo"))
    assert int(questions) >= 20


def test_llava_lite_help_lists_every_subcommand(capsys):
    from llava_lite.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name}" in listed for name in SUBCOMMANDS)
