"""envs.py and log.configure_logging: the level comes from KVHIVE_LOG_LEVEL, else LMCACHE_LOG_LEVEL."""

from __future__ import annotations

import logging

import pytest

from kvhive import envs
from kvhive.log import configure_logging, resolve_log_level


@pytest.mark.parametrize(
    ("kvhive_level", "lmcache_level", "expected"),
    [
        (None, None, logging.INFO),
        ("DEBUG", None, logging.DEBUG),
        ("debug", None, logging.DEBUG),  # case-insensitive
        (None, "warning", logging.WARNING),
        ("ERROR", "DEBUG", logging.ERROR),  # KVHIVE_ wins
        ("", "CRITICAL", logging.CRITICAL),  # empty counts as unset
        (" info ", None, logging.INFO),
    ],
)
def test_level_from_environment(
    monkeypatch: pytest.MonkeyPatch,
    kvhive_level: str | None,
    lmcache_level: str | None,
    expected: int,
) -> None:
    for name, value in (("KVHIVE_LOG_LEVEL", kvhive_level), ("LMCACHE_LOG_LEVEL", lmcache_level)):
        if value is not None:
            monkeypatch.setenv(name, value)
    logger = configure_logging()
    assert logger.name == "kvhive"
    assert logger.level == expected
    assert logging.getLogger("kvhive.server.x").getEffectiveLevel() == expected


def test_unknown_level_falls_back_to_info_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KVHIVE_LOG_LEVEL", "chatty")
    monkeypatch.setenv("LMCACHE_LOG_LEVEL", "DEBUG")  # not consulted: KVHIVE_ is set
    assert resolve_log_level() == (logging.INFO, "KVHIVE_LOG_LEVEL='CHATTY' is not a log level; using INFO")  # fmt: skip
    configure_logging()
    assert logging.getLogger("kvhive").level == logging.INFO
    assert "KVHIVE_LOG_LEVEL='CHATTY' is not a log level" in caplog.text


def test_configure_logging_is_idempotent_and_writes_to_current_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging()
    logger = configure_logging()
    own = [h for h in logger.handlers if type(h).__name__ == "_StderrHandler"]
    assert len(own) == 1
    assert logger.propagate  # embedding apps and caplog still see records
    logging.getLogger("kvhive.test").warning("hello %s", "there")
    err = capsys.readouterr().err
    assert "kvhive WARNING: hello there" in err
    assert "kvhive.test" in err


def test_envs_reads_the_live_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert envs.PYTHONHASHSEED is None
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert envs.PYTHONHASHSEED == "7"
    monkeypatch.setenv("PYTHONHASHSEED", "")
    assert envs.PYTHONHASHSEED == ""  # vLLM seeds with "" too
    assert {"KVHIVE_LOG_LEVEL", "LMCACHE_LOG_LEVEL", "PYTHONHASHSEED"} <= set(dir(envs))
    for var in envs.ENV_VARS.values():
        assert var.doc and var.default is None
    with pytest.raises(AttributeError):
        _ = envs.NOT_A_VARIABLE
