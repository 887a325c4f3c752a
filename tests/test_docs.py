"""The docs name everything the code has: a new setting, error code, close code or
metric without its line in docs/ fails here, and so does a README link to nowhere."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from gateway.config import PREFIX, Settings
from gateway.protocol.errors import CloseCode, ErrorCode
from gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("name", [PREFIX + f.name.upper() for f in dataclasses.fields(Settings)])
def test_every_setting_has_a_row(name):
    assert re.search(rf"^\| `{name}` \|", CONFIGURATION, re.MULTILINE), name


@pytest.mark.parametrize("code", typing.get_args(ErrorCode))
def test_every_error_code_is_documented(code):
    assert f"| `{code}` |" in PROTOCOL


@pytest.mark.parametrize(
    "code", [v for k, v in vars(CloseCode).items() if k.isupper() and isinstance(v, int)]
)
def test_every_close_code_is_documented(code):
    assert f"| {code} |" in PROTOCOL


@pytest.mark.parametrize("metric", sorted({m.name for m in Metrics().registry.collect()}))
def test_every_metric_is_documented(metric):
    assert metric in PROTOCOL


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local
    for link in local:
        assert (ROOT / link).exists(), link


def _default_cell(name: str) -> str:
    row = re.search(rf"^\| `{name}` \| ([^|]*) \|", CONFIGURATION, re.MULTILINE)
    assert row, name
    return row.group(1)


@pytest.mark.parametrize(
    "field",
    [f for f in dataclasses.fields(Settings)
     if isinstance(f.default, bool | int | float | str) and f.default not in ("", None)],
    ids=lambda f: f.name,
)
def test_documented_defaults_match_the_code(field):
    value = field.default
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    assert f"`{shown}`" in _default_cell(PREFIX + field.name.upper())
