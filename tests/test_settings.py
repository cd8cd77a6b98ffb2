"""The default settings work on a fresh machine, and another settings module can override them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "TEST_DATABASE_URL"}}
    clean.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_default_sqlite_database_is_created_in_a_data_dir_that_does_not_exist_yet(tmp_path):
    data = tmp_path / "fresh" / "data"
    proc = run_manage(
        "migrate", "--no-input", DJANGO_SETTINGS_MODULE="oioioi.settings", OIOIOI_DATA_DIR=str(data)
    )
    assert proc.returncode == 0, proc.stderr
    assert (data / "oioioi.sqlite3").stat().st_size > 0


def test_another_settings_module_can_import_and_override(tmp_path):
    (tmp_path / "site_settings.py").write_text(
        "from oioioi.settings import *  # noqa\nRESULTS_QUEUE = 'site.results'\n"
    )
    proc = run_manage(
        "shell",
        "-v",
        "0",
        "-c",
        "from oioioi.workers.conf import setting; "
        "print(setting('RESULTS_QUEUE'), setting('AMQP_URL'), setting('RESULTS_BATCH_SIZE'))",
        DJANGO_SETTINGS_MODULE="site_settings",
        PYTHONPATH=str(tmp_path),
        OIOIOI_DATA_DIR=str(tmp_path / "data"),
        AMQP_URL="amqp://u:p@broker:5672/%2F",
    )
    assert proc.returncode == 0, proc.stderr
    # The settings module wins, then the environment, then the default.
    assert proc.stdout.split() == ["site.results", "amqp://u:p@broker:5672/%2F", "100"]


def test_every_setting_has_a_default_and_the_environment_as_fallback(monkeypatch, settings):
    """Inside an OIOIOI the settings module names none of the return path's settings."""
    from oioioi.workers.conf import DEFAULTS, consumer_settings, setting

    for name in DEFAULTS:
        if hasattr(settings, name):
            delattr(settings, name)
        monkeypatch.delenv(name, raising=False)
    assert setting("RESULTS_QUEUE") == "oioioi.workers.results"
    assert setting("EVALMGR_DISPATCHER") == "oioioi.workers.dispatch.CeleryDispatcher"
    assert setting("METRICS_PORT") is None
    monkeypatch.setenv("RESULTS_BATCH_SIZE", "7")
    monkeypatch.setenv("RESULTS_DECLARE_TOPOLOGY", "false")
    assert consumer_settings().batch_size == 7
    assert consumer_settings().declare_topology is False
    settings.RESULTS_BATCH_SIZE = 9
    assert consumer_settings().batch_size == 9
