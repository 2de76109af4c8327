"""Tier 1: docs/configuration.md is what megatrain/config.py's comments generate, and every key has a comment."""
import dataclasses
import re
import subprocess
import sys

import pytest

from megatrain import config_docs
from megatrain.config import CHOICES, all_keys


@dataclasses.dataclass
class Documented:
    """A section written the way config.py writes them."""

    # two lines of comment
    # right above the field
    above_and_end: int = 1  # and one at the end of its line
    end_only: str = "a # b"  # a '#' inside a string is no comment

    # a comment set apart from the field by a blank line

    undocumented: bool = False


@dataclasses.dataclass
class Continued:
    key: int = 1  # a comment at the end of the line,
    #               continued under it
    next_key: int = 2  # documented


def test_the_committed_page_is_the_generated_one():
    if config_docs.PAGE.read_text(encoding="utf-8") != config_docs.render():
        pytest.fail(f"docs/configuration.md differs from megatrain/config.py's comments: run `{config_docs.COMMAND}`")


def test_every_key_of_every_section_has_a_description():
    docs = config_docs.key_docs()
    assert sorted(docs) == sorted(all_keys())
    assert [key for key, doc in docs.items() if not doc.strip()] == []
    assert all(config_docs.section_doc(cls) for cls in config_docs.sections().values())


def test_every_allowed_value_is_described():
    docs = config_docs.key_docs()
    for key, options in CHOICES.items():
        for option in options:
            if option:  # finetune.task's "" is described as "empty"
                assert re.search(rf"(^|\W){re.escape(option)}(\W|$)", docs[key]), (key, option)


def test_comments_above_and_at_the_end_of_a_field_are_its_description():
    assert config_docs.field_docs(Documented) == {
        "above_and_end": "two lines of comment right above the field and one at the end of its line",
        "end_only": "a '#' inside a string is no comment",
        "undocumented": "",
    }


def test_a_key_without_a_comment_or_a_stray_comment_line_stops_the_generator(monkeypatch):
    monkeypatch.setattr(config_docs, "sections", lambda: {"demo": Documented})
    with pytest.raises(ValueError, match="config key demo.undocumented has no comment"):
        config_docs.render()
    with pytest.raises(ValueError, match="belongs to no key"):
        config_docs.field_docs(Continued)


def test_check_mode_names_the_command_when_the_page_differs(tmp_path, capsys):
    assert config_docs.main(["--check"]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(config_docs.render().replace("`model.n_layers`", "`model.layers`"), encoding="utf-8")
    assert config_docs.main(["--check", str(stale)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{stale} differs from the comments in megatrain/config.py: regenerate it with `{config_docs.COMMAND}`"]


def test_the_module_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "megatrain.config_docs"], capture_output=True, text=True, check=True)
    assert out.stdout == config_docs.render()
