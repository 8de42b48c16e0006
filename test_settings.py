"""Configuration: settings.py, .env and the environment."""

import re
from pathlib import Path
from typing import Any

import pytest

import main
from conftest import (
    HERE,
)
from settings import DEPLOYMENT_VARIABLES, Settings, misspelt_variables

# --- .env -------------------------------------------------------------------------------------


def test_env_example_lists_every_setting() -> None:
    """.env.example names each field of settings.py, and besides them only keys compose or gunicorn read; it loads."""
    lines = (HERE / ".env.example").read_text().splitlines()
    # A setting line is KEY=value, or "# KEY=value" for one that is best left unset.
    keys = {m[1] for line in lines if (m := re.fullmatch(r"(?:# )?([A-Z_]+)=.*", line))}

    assert {name.upper() for name in Settings.model_fields} <= keys
    assert set() == keys - {name.upper() for name in Settings.model_fields} - DEPLOYMENT_VARIABLES
    Settings(_env_file=HERE / ".env.example")


def test_unknown_key_in_env_file_stops_the_start_naming_it_never_its_value(tmp_path: Path) -> None:
    """A typo in .env is never ignored: the start fails, naming the key and not its value."""
    from pydantic import ValidationError

    env_file = tmp_path / ".env"
    env_file.write_text("DB_POOL_SZIE=5151\n")

    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=env_file)

    assert "db_pool_szie" in str(refused.value).lower()
    assert "5151" not in str(refused.value)


def test_keys_compose_and_gunicorn_read_in_env_file_are_accepted(tmp_path: Path) -> None:
    """.env is compose's and gunicorn's file too: their keys there do not stop the app."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}=4\n" for name in sorted(DEPLOYMENT_VARIABLES)) + "DB_POOL_SIZE=7\n")

    assert 7 == Settings(_env_file=env_file).db_pool_size


# --- The environment -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable",
    [
        # Variables of other programs that begin like a setting (DB_, REDIS_, LOG_, API_).
        "DB_HOST", "DB_USER", "DB_PASSWORD", "REDIS_PASSWORD", "LOG_FORMAT", "API_BASE_URL",
        # The system's, Kubernetes' (a Service named redis), and this deployment's other programs'.
        "PATH", "HOSTNAME", "REDIS_SERVICE_HOST", "REDIS_PORT_6379_TCP_ADDR", *sorted(DEPLOYMENT_VARIABLES),
        "RATE_LIMIT_TABLE", "PROMETHEUS_MULTIPROC_DIR", "FORWARDED_ALLOW_IPS", "TEST_MYSQL_URL",
    ],
)  # fmt: skip
def test_variables_of_other_programs_in_the_environment_neither_stop_the_start_nor_warn(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is every program's: a variable that is not a setting is left alone."""
    monkeypatch.setenv(variable, "1")

    Settings(_env_file=None)
    assert [] == [found for found in misspelt_variables() if found[0] == variable]


@pytest.mark.parametrize(("variable", "setting"), [("DB_POOL_SZIE", "DB_POOL_SIZE"), ("TELEMETRY_ON", "TELEMETRY")])
async def test_misspelt_setting_in_the_environment_is_warned_of_at_start_by_both_names(
    variable: str, setting: str, lifespan_state: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    """A variable spelt nearly as a setting does not stop the start; the start's log names it and the setting."""
    monkeypatch.setenv(variable, "5151")

    async with main.app.router.lifespan_context(main.app):
        pass

    log = capfd.readouterr().err
    assert f"the environment variable {variable} is not a setting: did you mean {setting}?" in log
    assert "5151" not in log
