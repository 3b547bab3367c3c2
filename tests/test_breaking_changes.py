"""Release 0.2.0: the version is stated once, everywhere the same, the CHANGELOG lists the
breaking changes, and each old call gets a message saying what changed (issue 20, 4).
"""

from __future__ import annotations

import re
import tomllib

import optax
import pytest
from markdown_blocks import ROOT

import agsopt
from agsopt import functions as fns
from agsopt.study import build_optimizer, gd_learning_rate, gradient_spec
from agsopt.study.cli import main

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()


def test_version_is_the_same_everywhere_and_a_minor_bump():
    assert agsopt.__version__ == PROJECT["version"]
    major, minor, _ = (int(part) for part in agsopt.__version__.split("."))
    # breaking changes before 1.0 bump the minor version (Semantic Versioning, see CHANGELOG)
    assert (major, minor) >= (0, 2)


def test_changelog_lists_the_breaking_changes():
    unreleased = CHANGELOG.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    breaking = unreleased.split("### Breaking", 1)[1].split("\n### ", 1)[0]
    for needle in (
        "(dim, function, key)",
        "warmup_steps",
        "--preset paper",
        "d100",
        "SAMState",
        "BSAMState",
        "import agsopt.sam",
    ):
        assert needle in breaking, needle
    assert re.search(r"^- ", breaking, re.M)


def test_an_old_study_factory_says_the_signature_changed():
    old = lambda d, fn: gradient_spec(optax.sgd(gd_learning_rate(fn)), 1, "GD")
    with pytest.raises(TypeError, match=r"\(dim, function, key\) since agsopt 0\.2\.0"):
        build_optimizer("old", 3, fns.get("rastrigin"), registry={"old": old})
    new = lambda d, fn, key: old(d, fn)
    assert build_optimizer("new", 3, fns.get("rastrigin"), registry={"new": new}).description


def test_vsam_without_a_warm_up_says_what_changed():
    with pytest.raises(ValueError, match=r"0\.2\.0.*warmup_steps=2 \* window"):
        agsopt.vsam(0.05)


def test_preset_paper_says_it_was_renamed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--preset", "paper"])
    assert exit_info.value.code == 2
    assert "'paper' was renamed 'd100'" in capsys.readouterr().err
