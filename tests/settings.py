"""Settings for the test suite: the project's, plus a recipe app the tests observe jobs with.

The pytest process makes its test database on ``TEST_DATABASE_URL`` (PostgreSQL) or, by default,
in an SQLite file, so that consumer processes started by the tests can open the same database.
Those processes get the test database's own URL in ``DATABASE_URL``.
"""

import os
import tempfile
import uuid

from oioioi.settings import *  # noqa: F403
from oioioi.settings import INSTALLED_APPS, database_config

INSTALLED_APPS = [*INSTALLED_APPS, "tests.recipeapp"]

_run = uuid.uuid4().hex[:8]
if os.environ.get("TEST_DATABASE_URL"):
    DATABASES = {"default": database_config(os.environ["TEST_DATABASE_URL"])}
    DATABASES["default"]["TEST"] = {"NAME": f"test_oioioi_{_run}"}
elif not os.environ.get("DATABASE_URL"):
    _dir = tempfile.mkdtemp(prefix="oioioi-test-")
    DATABASES = {"default": database_config(f"sqlite:///{_dir}/main.sqlite3")}
    DATABASES["default"]["TEST"] = {"NAME": f"{_dir}/test.sqlite3"}

#: The suite's consumers run the recipes in their own process (the fault tests kill a consumer in
#: a recipe to test the claims), not the standalone default's runner process, which
#: tests/test_runner_process.py starts by name.
EVALMGR_DISPATCHER = os.environ.get("EVALMGR_DISPATCHER", "oioioi.workers.dispatch.LocalDispatcher")

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
