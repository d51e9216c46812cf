"""Today's `modal_app.py`, unmodified, under `scripts/modal-rehearsal`: a request end to end.

The bucket is the loopback moto server, the database the session's PostgreSQL, the
model the tiny one, keys static (`MAGICMIX_API_KEYS`). Everything Modal would do
(containers, batches, snapshots) is the rehearsal's emulation; see
tests/test_rehearsal_runtime.py for it, tests/test_rehearsal_findings.py for issue 24's
findings and tests/test_rehearse.py for the check on every landing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from magicmix.store.testing import TempPostgres
from tests.rehearsal_fixtures import ADMIN, app_env, deployed

pytestmark = pytest.mark.slow  # torch in a GPU snapshot, for one request


def test_a_magic_mix_request_through_the_rehearsed_web_function_answers_a_png(
    tmp_path: Path, s3_server: str, tiny_model_dir: Path, postgres: TempPostgres
) -> None:
    env = app_env(s3_server, tiny_model_dir, postgres.fresh_url())
    with deployed(tmp_path, env) as app:
        reply = app.mix(ADMIN)
        if reply["status"] == "processing":
            reply = app.until_done(reply["id"], ADMIN, timeout=200)
        assert reply["status"] == "success", reply
        image = app.http.get(reply["output"][0])
        totals = app.control.counters()["totals"]
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert totals["modal.spawn"] >= 1 and totals["batches"] >= 1
