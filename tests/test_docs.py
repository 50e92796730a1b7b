"""The documentation points at things that exist: links and images, flagfiles, modules and the tests the
Reliability table cites. Renaming a test or a recipe must not leave README describing one that is gone."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "saved_models" / "README.md",
        ROOT / "saved_models" / "fer_resnet18" / "README.md"]
DOCS += sorted((ROOT / "flags").rglob("*.cfg"))  # the recipes' comments name other recipes, tools and flags too
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAGFILE = re.compile(r"(?<![\w/])flags/[\w/]+\.cfg")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # flags/X.cfg, flags/RECIPE.cfg: a name for the reader to fill in
RECIPE_NAME = re.compile(r"`([\w*]+(?:/[\w*]+)*\.cfg)`")  # a recipe named inside flags/, as the recipe table does
FORMER_NAMES = {"fer2013_long_erasing_decay_bf16.cfg"}  # history names a file as it was then
MODULE = re.compile(r"python -m fer_keras\.(\w+)")
OPTION = re.compile(r"(?<![\w-])--([a-z][\w-]*)")
# Options of the other programs the documents show: absl's own, pytest, pip, docker, saved_model_cli, TensorBoard, git.
FOREIGN_OPTIONS = {"flagfile", "helpfull", "durations", "index-url", "rm", "dir", "tag_set", "signature_def", "inputs",
                   "logdir", "host", "no-renames", "format", "diff-filter"}
TEST_REF = re.compile(r"(?:tests/)?(test_\w+\.py)?::(test_\w+)")


@functools.cache
def _test_names() -> dict[str, set[str]]:
    """Each test file's test functions, parsed once for every document."""
    return {path.name: {node.name for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}
            for path in (ROOT / "tests").glob("test_*.py")}


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_and_images_resolve(doc):
    missing = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and in-page anchors
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_named_flagfiles_and_tools_exist(doc):
    text = doc.read_text()
    named = {f for f in FLAGFILE.findall(text)
             if not PLACEHOLDER.fullmatch(Path(f).stem) and Path(f).name not in FORMER_NAMES}
    flagfiles = sorted(f for f in named if not (ROOT / f).is_file())
    bare = {f for f in RECIPE_NAME.findall(text) if not f.startswith("flags/") and f not in FORMER_NAMES}
    flagfiles += sorted(f for f in bare if not any((ROOT / "flags").rglob(f)))  # in flags/ or a folder of it
    modules = sorted({m for m in MODULE.findall(text) if not (ROOT / "fer_keras" / f"{m}.py").is_file()})
    assert not flagfiles, f"{doc.relative_to(ROOT)} names flagfiles that do not exist: {flagfiles}"
    assert not modules, f"{doc.relative_to(ROOT)} names tools that do not exist: {modules}"


@functools.cache
def _defined_flags() -> set[str]:
    """Every flag a fer_keras tool defines: the name given to each ``flags.DEFINE_*`` call, found in the parsed
    sources (importing the tools would import TensorFlow)."""
    names = set()
    for path in (ROOT / "fer_keras").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")).startswith(
                    "DEFINE_"):
                name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    names.add(name.value)
    return names


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_flag_named_is_defined(doc):
    """A flag renamed or removed must not live on in the documents (``--noNAME`` is a boolean's negation)."""
    defined = _defined_flags()
    assert {"data", "tta", "precise_bn", "export_tta"} <= defined, "flag definitions no longer found by the pattern"
    unknown = sorted({o for o in OPTION.findall(doc.read_text())
                      if o not in defined and o not in FOREIGN_OPTIONS
                      and not (o.startswith("no") and o[2:] in defined)})
    assert not unknown, f"{doc.relative_to(ROOT)} names flags no fer_keras tool defines: {unknown}"


def _cited_tests(text: str) -> list[tuple[str | None, str]]:
    """``(file, test)`` for every backticked ``test_x.py::test_y`` and ``::test_z`` (the file named before it)."""
    cited, current = [], None
    for span in re.findall(r"`([^`]*::[^`]*)`", text):
        for file, name in TEST_REF.findall(span):
            current = file or current
            cited.append((current, name))
    return cited


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_test_the_docs_cite_exists(doc):
    names = _test_names()
    cited = _cited_tests(doc.read_text())
    if doc == ROOT / "README.md":
        assert len(cited) > 40, f"only {len(cited)} test references found: has the Reliability table's form changed?"
    missing = [f"{file}::{name}" for file, name in cited if file not in names or name not in names[file]]
    assert not missing, f"{doc.relative_to(ROOT)} cites tests that do not exist: {missing}"
