"""sioworkersd's return to the queue: what can be checked without Twisted or sioworkers.

The return path itself runs in a real sioworkersd in the upstream tier
(``tests/upstream/e2e/test_sioworkersd.py``); here are its configuration (the return-URL rule,
the broker settings from the environment and a file) and the installer's wheel: its contents,
its metadata, and that nothing it loads for sioworkersd imports Django or another dependency the
wheel does not declare.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from consumer.config import Settings, from_environ
from sioworkersd_amqp.config import (
    ConfigError,
    ReturnConfig,
    broker_settings,
    names_more_than_the_queue,
    names_the_queue,
    read_env_file,
)
from tests.conftest import ROOT

INSTALL = ROOT / "deploy" / "sioworkersd" / "install"


@pytest.mark.parametrize(
    ("url", "queue", "more"),
    [
        ("amqp:", True, False),
        ("amqp://", True, False),
        ("AMQP:", True, False),
        ("amqps:", True, True),
        ("amqp://user:secret@broker:5672/%2F", True, True),
        ("amqp:results?token=x", True, True),
        ("http://127.0.0.1:7890/", False, None),
        ("https://oioioi.example/?token=amqp:", False, None),
        ("amqp", False, None),
        ("", False, None),
        (None, False, None),
    ],
)
def test_which_return_urls_name_the_queue(url, queue, more):
    assert names_the_queue(url) is queue
    if queue:
        assert names_more_than_the_queue(url) is more


def test_the_env_file_reads_as_a_shell_would_and_overrides_the_environment(tmp_path):
    path = tmp_path / "amqp.env"
    path.write_text(
        "# sioworkersd's broker\n"
        "\n"
        "export AMQP_URL='amqp://sioworkersd:s3cret@broker:5672/%2F'\n"
        'RESULTS_EXCHANGE = "oioioi.other"\n'
        "RESULTS_DECLARE_TOPOLOGY=false\n"
    )
    assert read_env_file(path)["AMQP_URL"] == "amqp://sioworkersd:s3cret@broker:5672/%2F"
    environ = {"AMQP_URL": "amqp://from-env/", "RESULTS_ROUTING_KEY": "rk", "RESULTS_QUEUE": ""}
    settings = broker_settings(environ, str(path))
    assert settings.amqp_url == "amqp://sioworkersd:s3cret@broker:5672/%2F"
    assert settings.exchange == "oioioi.other"
    assert settings.routing_key == "rk"
    assert settings.queue == Settings().queue  # empty is unset, as in the Django settings
    assert settings.declare_topology is False
    assert broker_settings(environ).amqp_url == "amqp://from-env/"


def test_a_bad_env_file_or_value_is_refused_without_repeating_the_line(tmp_path):
    path = tmp_path / "amqp.env"
    path.write_text("AMQP_URL amqp://u:hunter2@broker/\n")
    with pytest.raises(ConfigError, match="line 1: not a KEY=VALUE line") as error:
        read_env_file(path)
    assert "hunter2" not in str(error.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_env_file(tmp_path / "missing.env")
    with pytest.raises(ConfigError, match="AMQP_HEARTBEAT is not valid"):
        broker_settings({"AMQP_HEARTBEAT": "soon"})
    with pytest.raises(ConfigError, match="connections"):
        ReturnConfig(broker=Settings(), connections=0)


def test_the_environment_is_read_as_the_django_settings_read_it():
    settings = from_environ(
        {
            "AMQP_URL": "amqps://u:p@b/%2F",
            "AMQP_HEARTBEAT": "10",
            "RESULTS_RETRY_DELAY_MS": "300",
            "RESULTS_QUEUE_TYPE": "classic",
            "RESULTS_DECLARE_TOPOLOGY": "0",
        }
    )
    assert (settings.amqp_url, settings.heartbeat, settings.retry_delay_ms) == (
        "amqps://u:p@b/%2F",
        10,
        300,
    )
    assert (settings.queue_type, settings.declare_topology) == ("classic", False)
    assert from_environ({}) == Settings()


# --- the installer's wheel -----------------------------------------------------------------------


def build(tmp_path: Path, *args: str) -> zipfile.ZipFile:
    done = subprocess.run(
        [sys.executable, str(INSTALL), "--wheel-only", str(tmp_path), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return zipfile.ZipFile(done.stdout.strip())


def test_the_wheel_holds_the_plugin_the_library_and_the_twistd_drop_in(tmp_path):
    wheel = build(tmp_path)
    names = set(wheel.namelist())
    assert "twisted/plugins/sioworkersd_amqp_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert {"sioworkersd_amqp/plugin.py", "consumer/publish.py", "consumer/transport.py"} <= names
    assert not any("dropin" in n or "__pycache__" in n for n in names)
    [info] = {n.split("/")[0] for n in names if ".dist-info/" in n}
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "Name: oioioi-results-sioworkersd" in metadata
    wanted = (ROOT / "deploy" / "sioworkersd" / "requirements.txt").read_text()
    assert "Requires-Dist: pika>=1.3,<2" in metadata and "pika>=1.3,<2" in wanted
    assert "Requires-Dist: tenacity>=9,<10" in metadata
    # RECORD lists every file with its hash, as pip checks it
    record = wheel.read(f"{info}/RECORD").decode().splitlines()
    for line in record:
        path, digest, size = line.rsplit(",", 2)
        if path.endswith("RECORD"):
            continue
        data = wheel.read(path)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert digest == f"sha256={expected.decode()}" and int(size) == len(data)
    assert len(record) == len(names)
    without = build(tmp_path / "without", "--without-library")
    assert not any(n.startswith("consumer/") for n in without.namelist())


def _imports(source: str, package: str) -> set[str]:
    """Absolute module names a module imports (relative imports resolved within ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_what_sioworkersd_loads_imports_no_django_and_no_undeclared_dependency(tmp_path):
    # Every module the plugin reaches, following its imports through the wheel's own modules
    wheel = build(tmp_path)
    modules = {
        n[:-3].replace("/__init__", "").replace("/", "."): n
        for n in wheel.namelist()
        if n.endswith(".py") and ".dist-info" not in n
    }
    todo = ["twisted.plugins.sioworkersd_amqp_plugin"]
    seen: set[str] = set()
    outside: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imports(wheel.read(modules[module]).decode(), module):
            if name in modules:
                todo.append(name)
            elif name.split(".")[0] not in {"consumer", "sioworkersd_amqp"}:
                outside.add(name.split(".")[0])
    assert "consumer.publish" in seen and "sioworkersd_amqp.taskmanager" in seen
    assert "results_shim.server" not in seen  # the shim's multipart parser is not needed there
    third_party = outside - set(sys.stdlib_module_names) - {"__future__"}
    # sioworkers and what it brings (Twisted, zope.interface), and the wheel's two requirements
    assert third_party <= {"twisted", "sio", "zope", "pika", "tenacity"}, third_party


def test_the_supervisord_entry_runs_the_plugin_with_its_settings_in_a_file(tmp_path):
    from supervisor.datatypes import RestartWhenExitUnexpected
    from supervisor.options import ServerOptions

    # Rendered the way OIOIOI renders its supervisord.conf template
    text = (ROOT / "deploy" / "supervisord" / "sioworkersd.conf").read_text()
    (tmp_path / "programs.conf").write_text(text.replace("{{ PROJECT_DIR }}", str(tmp_path)))
    (tmp_path / "logs").mkdir()
    main = tmp_path / "supervisord.conf"
    main.write_text(
        f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/s.pid\n"
        "[include]\nfiles=programs.conf\n"
    )
    options = ServerOptions()
    options.realize(args=["-c", str(main)])
    [program] = [p for g in options.process_group_configs for p in g.process_configs]
    assert program.name == "sioworkersd"  # in place of upstream's entry
    args = program.command.split()
    assert (
        args[args.index("sioworkersd-amqp") - 1] == f"--pidfile={tmp_path}/pidfiles/sioworkersd.pid"
    )
    assert f"--amqp-env-file={tmp_path}/sioworkersd-amqp.env" in args
    assert f"--database={tmp_path}/sioworkersd.db" in args
    assert "amqp://" not in text and not program.environment
    assert program.autorestart is RestartWhenExitUnexpected and program.stopwaitsecs >= 30
