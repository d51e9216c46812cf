"""`python -m benchmarks`: the whole CPU suite, (a) to (g), into one table and one JSON."""

from __future__ import annotations

from benchmarks import coldstart, engine, service, store
from benchmarks.common import RESULTS_DIR, run_suite

if __name__ == "__main__":
    run_suite(
        [*engine.BENCHES, *service.BENCHES, *store.BENCHES, *coldstart.BENCHES], None, RESULTS_DIR
    )
