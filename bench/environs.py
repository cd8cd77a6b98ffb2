"""Realistic environs: a programming submission as OIOIOI hands it to sioworkersd, and its result.

The shape follows upstream: ``oioioi.programs.handlers.run_tests`` builds one ``*-exec`` job per
test from the test's own environ (``in_file``, ``hint_file``, limits, ...) plus the submission's
``exe_file``/``exec_info``/checker settings; sioworkersd adds ``group_id``/``task_id``/
``contest_uid`` to each job; the executor (``sio.executors.common`` and ``checker``) adds
``result_code``, ``result_string``, ``time_used`` (ms), ``mem_used`` (KiB), ``num_syscalls`` and
``result_percentage``. What comes back is the whole environ that was sent, with ``workers_jobs``
and ``workers_jobs.results``.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

#: Tests per submission for each size: about 2 KB, 150 KB and 1 MB of JSON. Upstream returns each
#: test three times (``tests``, ``workers_jobs``, ``workers_jobs.results``), so 100 tests is 150 KB.
SIZES: dict[str, int] = {"small": 1, "typical": 100, "large": 680}

RESTORE_FUNC = "oioioi.sioworkers.handlers.restore_job"

#: What is left of the recipe when the results come back: short, as the brief asks; each phase
#: is a real phase of the evaluation manager (a checkpointed transaction), doing no work itself.
RECIPE_AFTER_RESULTS = [["run_tests_end", "oioioi.evalmgr.tasks._placeholder"]]

ERROR_HANDLERS = [
    ["remove_queuedjob_on_error", "oioioi.evalmgr.handlers.remove_queuedjob_on_error"],
]

_CODES = ["OK"] * 14 + ["WA", "TLE", "RE", "MLE"]
_STRINGS = {
    "OK": "ok",
    "WA": "wrong answer: expected '3', found '4' in line 1",
    "TLE": "time limit exceeded",
    "RE": "runtime error: exited with code 139 (SIGSEGV)",
    "MLE": "memory limit exceeded",
}


def _test_names(count: int) -> list[str]:
    # Upstream names tests after their group: 0a, 1a, 1b, 2a, ... with a few tests per group.
    names: list[str] = []
    group = 0
    while len(names) < count:
        for letter in "abcd"[: 1 + group % 4]:
            names.append(f"{group}{letter}")
        group += 1
    return names[:count]


def _test_env(name: int | str, index: int, problem: int, rng: random.Random) -> dict[str, Any]:
    name = str(name)
    group = name.rstrip("abcdefghijklmnopqrstuvwxyz") or name
    kind = "EXAMPLE" if group == "0" else "NORMAL"
    return {
        "id": problem * 10_000 + index,
        "name": name,
        "in_file": f"/problems/{problem}/tests/{name}.in@{rng.randrange(1, 9)}",
        "hint_file": f"/problems/{problem}/tests/{name}.out@{rng.randrange(1, 9)}",
        "kind": kind,
        "group": group,
        "max_score": 100 if kind == "NORMAL" else 0,
        "order": index,
        "exec_time_limit": 1000 * rng.choice([1, 2, 5]),
        "exec_mem_limit": 262144,
        "to_judge": True,
    }


def _job(test: dict[str, Any], submission: dict[str, Any]) -> dict[str, Any]:
    job = dict(test)
    job.update(
        job_type="cpu-exec",
        task_priority=100,
        exe_file=submission["compiled_file"],
        exec_info=submission["exec_info"],
        check_output=True,
        untrusted_checker=True,
    )
    return job


def _result(job: dict[str, Any], group_id: str, rng: random.Random) -> dict[str, Any]:
    code = rng.choice(_CODES)
    result = dict(job)
    result.update(
        group_id=group_id,
        task_id=uuid.UUID(int=rng.getrandbits(128)).urn,
        contest_uid=["c1", None],
        result_code=code,
        result_string=_STRINGS[code],
        time_used=rng.randrange(1, job["exec_time_limit"]),
        mem_used=rng.randrange(1024, 262144),
        num_syscalls=rng.randrange(20, 400),
        result_percentage=[100, 1] if code == "OK" else [0, 1],
    )
    return result


@dataclass(frozen=True)
class Template:
    """One size of submission: the saved environ and the returned environ, without the ids."""

    size: str
    tests: int
    #: What the job saved when it was transferred (``SavedEnviron.environ``).
    saved: dict[str, Any]
    #: What sioworkersd sends back (without the ids of a particular job).
    returned: dict[str, Any]

    def saved_json(self, job_id: str, submission_id: int) -> str:
        env = dict(self.saved)
        env["job_id"] = job_id
        env["submission_id"] = submission_id
        return json.dumps(env)

    def returned_env(
        self, job_id: str, submission_id: int, saved_environ_id: int
    ) -> dict[str, Any]:
        env = dict(self.returned)
        env.update(
            job_id=job_id,
            submission_id=submission_id,
            saved_environ_id=saved_environ_id,
            group_id=f"GROUP_{uuid.uuid4().urn}",
        )
        return env

    def body(self, job_id: str, submission_id: int, saved_environ_id: int) -> tuple[str, bytes]:
        """(group id, the JSON sioworkersd would send: default separators, like its json.dumps)."""
        env = self.returned_env(job_id, submission_id, saved_environ_id)
        return env["group_id"], json.dumps(env).encode()


def template(size: str, seed: int = 7) -> Template:
    count = SIZES[size]
    rng = random.Random(seed)
    problem = 4242
    submission: dict[str, Any] = {
        "submission_id": 0,
        "problem_instance_id": 77,
        "problem_id": problem,
        "round_id": 12,
        "contest_id": "c1",
        "submission_kind": "NORMAL",
        "is_rejudge": False,
        "language": "cpp",
        "exec_mode": "cpu",
        "compiled_file": f"/compiled/{uuid.UUID(int=rng.getrandbits(128)).hex}.e",
        "exec_info": {"mode": "cpp"},
        "check_outputs": True,
        "untrusted_checker": True,
        "compilation_result": "OK",
        "compilation_message": "",
        "test_scorer": "oioioi.programs.utils.discrete_test_scorer",
        "group_scorer": "oioioi.programs.utils.min_group_scorer",
        "score_aggregator": "oioioi.programs.utils.sum_score_aggregator",
    }
    names = _test_names(count)
    tests = {name: _test_env(name, i, problem, rng) for i, name in enumerate(names)}
    jobs = {name: _job(test, submission) for name, test in tests.items()}
    saved = dict(submission)
    saved.update(
        tests=tests,
        workers_jobs=jobs,
        **{"workers_jobs.extra_args": {}, "workers_jobs.not_to_judge": []},
        recipe=RECIPE_AFTER_RESULTS,
        error_handlers=ERROR_HANDLERS,
        restore_environ_func=RESTORE_FUNC,
    )
    group_id = f"GROUP_{uuid.UUID(int=rng.getrandbits(128)).urn}"
    returned = dict(submission)
    returned.update(
        tests=tests,
        workers_jobs=jobs,
        **{
            "workers_jobs.extra_args": {},
            "workers_jobs.not_to_judge": [],
            "workers_jobs.results": {
                name: _result(job, group_id, rng) for name, job in jobs.items()
            },
        },
        return_url="http://127.0.0.1:7890/",
        swpeer_seq=0,
    )
    # The legacy receiver and the consumer both refuse these in a resuming environ.
    returned.pop("restore_environ_func", None)
    return Template(size=size, tests=count, saved=saved, returned=returned)


def body_size(size: str) -> int:
    t = template(size)
    return len(t.body("urn:uuid:" + "0" * 32, 1, 1)[1])
