"""A short load test of the apps: concurrent gradio_client users against one server on 127.0.0.1.

The full run (20 users, 60 s) is benchmarks/bench_apps_load.py, whose code this test drives.
"""

from __future__ import annotations

import pytest
from conftest import load_benchmark

bench_apps_load = load_benchmark("bench_apps_load")

USERS, SECONDS = 8, 10.0
# Stated bounds. Gradio's queue serves each endpoint in order, one request at a time, so a request waits
# at most for the requests of the other users queued before it: with every request bounded in size
# (about a second here, on a busy 2-core CPU), none may take longer than STARVATION_S, although one user
# sends nothing but the slowest accepted request.
STARVATION_S = 30.0
MEMORY_GROWTH_MB = 300.0


@pytest.fixture(scope="module")
def server(write_photos):
    photos = write_photos(bench_apps_load.PHOTOS)
    with bench_apps_load.serve(photos) as (url, features):
        yield url, sorted(photos.glob("*.png")), features


def test_concurrent_users_get_answers_in_bounded_time_and_memory(server) -> None:
    url, photos, features = server
    assert url.startswith("http://127.0.0.1:")
    report = bench_apps_load.run_load(url, photos, features, USERS, SECONDS)
    assert report.failed == 0, report.errors[:5]
    others = [v for kind in ("search_text", "search_image", "steer") for v in report.latencies_s[kind]]
    assert len(others) >= USERS - 1  # every user got answers, not only the one sending slow requests
    assert report.latencies_s["steer_at_bound"] and report.latencies_s["steer_over_bound"]
    assert max(others) < STARVATION_S, report.table()
    assert report.rss_after_mb - report.rss_before_mb < MEMORY_GROWTH_MB
