"""The security settings of the HTTP side: apiToken, metricsToken and the `api:` section,
read from the config file and the environment, and refused naming their field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forecaster.config import load_settings
from forecaster.errors import InvalidInputError

TOKEN = "api-t0ken-never-shown"
SCRAPE = "scrape-t0ken-never-shown"


# -- the settings --------------------------------------------------------------------------


def _config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def test_tokens_and_the_api_section_are_read_from_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "api").write_text(f"{TOKEN}\n")
    (tmp_path / "scrape").write_text(f"{SCRAPE}\n")
    raw = {"apiToken": {"file": str(tmp_path / "api")},
           "metricsToken": {"file": str(tmp_path / "scrape")},
           "api": {"allowQueries": True}}
    loaded = load_settings(_config(tmp_path, raw), env={})
    assert (loaded.api_token, loaded.metrics_token) == (TOKEN, SCRAPE)
    assert loaded.api.allow_queries is True
    assert TOKEN not in repr(loaded) and SCRAPE not in repr(loaded)
    assert load_settings(env={}).api.allow_queries is False
    from_env = load_settings(env={"FORECASTER_METRICS_TOKEN": f"{SCRAPE}\n"})
    assert from_env.metrics_token == SCRAPE
    from_file = load_settings(env={"FORECASTER_METRICS_TOKEN_FILE": str(tmp_path / "scrape")})
    assert from_file.metrics_token == SCRAPE


@pytest.mark.parametrize(
    ("raw", "env", "field"),
    [
        ({"api": {"allowQueries": True}}, {}, "api.allowQueries"),
        ({"api": {"allowQueries": "yes"}}, {}, "api.allowQueries"),
        ({"api": {"allowQuery": True}}, {}, "api.allowQuery"),
        ({"api": ["allowQueries"]}, {}, "api"),
        ({"metricsToken": SCRAPE}, {}, "metricsToken"),  # never inline
        ({"metricsToken": {"env": "EMPTY"}}, {"EMPTY": " \n"}, "metricsToken.env"),
        ({"apiToken": {"env": "EMPTY"}}, {"EMPTY": ""}, "apiToken.env"),
        ({}, {"FORECASTER_METRICS_TOKEN": ""}, "metricsToken.env"),
    ],
)
def test_bad_security_settings_name_their_field(
    tmp_path: Path, raw: dict[str, Any], env: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        load_settings(_config(tmp_path, raw), env=env)
    assert refused.value.field == field
    assert SCRAPE not in str(refused.value)
