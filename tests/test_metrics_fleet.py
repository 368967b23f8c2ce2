"""Metrics add up across processes: API processes (`PROMETHEUS_MULTIPROC_DIR`, `uvicorn
--workers`, several instances) and worker nodes (each serves its own, labelled by node), all real
processes. Summing what every target serves gives the true totals, never a multiple of them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from app.auth import issue_token
from app.metrics import CompactingCollector
from app.settings import Settings
from harness.processes import ApiProcess, RedisServer, free_port, fresh_directory
from tests.conftest import LOG_DIR, RUN_ID, start_worker
from tests.support import wait_converged, wait_until
from tests.test_handlers import message

Sample = Any
WORKER_FAMILIES = ("dualwrite_tasks_total", "dualwrite_rows_written_total")
WORKER_SERIES = (*WORKER_FAMILIES, "dualwrite_sync_lag_seconds_count")


def samples(body: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(body) for s in family.samples]


def scrape(url: str) -> list[Sample]:
    return samples(httpx.get(url, timeout=30).raise_for_status().text)


def total(scrapes: Iterable[list[Sample]], name: str, **labels: str) -> float:
    """The sum of every sample called `name` with these labels, over every scrape: what
    `sum(name{labels})` gives in Prometheus over the targets."""
    return sum(  # type: ignore[no-any-return]
        s.value
        for scraped in scrapes
        for s in scraped
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def headers(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings.signing_secret, user)}"}


def drive(bases: list[str], settings: Settings, chats: int) -> dict[tuple[str, str, str], int]:
    """Requests spread round-robin over `bases`, each on a connection of its own: per chat a
    create, an append and a read of another user's chat (404). Returns the true count per
    (method, route, status)."""
    sent: dict[tuple[str, str, str], int] = {}

    def count(method: str, route: str, status: int) -> None:
        sent[(method, route, str(status))] = sent.get((method, route, str(status)), 0) + 1

    user = f"fleet-{uuid.uuid4().hex[:8]}"
    for i in range(chats):
        base = bases[i % len(bases)]
        created = httpx.post(f"{base}/chats", json={}, headers=headers(settings, user), timeout=30)
        assert created.status_code == 201, created.text
        count("POST", "/chats", 201)
        chat_id = created.json()["id"]
        base = bases[(i + 1) % len(bases)]
        appended = httpx.post(
            f"{base}/chats/{chat_id}/messages",
            json={"message": message("user")},
            headers=headers(settings, user),
            timeout=30,
        )
        assert appended.status_code == 201, appended.text
        count("POST", "/chats/{chat_id}/messages", 201)
        other = httpx.get(f"{base}/chats/{chat_id}", headers=headers(settings, "x"), timeout=30)
        assert other.status_code == 404
        count("GET", "/chats/{chat_id}", 404)
    return sent


def assert_requests(scrapes: list[list[Sample]], sent: dict[tuple[str, str, str], int]) -> None:
    for (method, route, status), n in sent.items():
        labels = {"method": method, "route": route, "status": status}
        assert total(scrapes, "dualwrite_requests_total", **labels) == n, (labels, n)


def enqueued(scrapes: list[list[Sample]]) -> float:
    # Each append is the first write of its chat: its sync is published, never coalesced.
    return total(scrapes, "dualwrite_enqueued_total", task="chats.sync_messages")


def test_two_api_processes_of_one_instance_export_their_sum_from_either(
    settings: Settings, tmp_path: Path, engine: Engine
) -> None:
    """Two API processes sharing one PROMETHEUS_MULTIPROC_DIR (as the processes of one `uvicorn
    --workers` or gunicorn instance do): whichever answers the scrape exports the sum of both,
    and the database gauges once, not once per process."""
    shared = fresh_directory(tmp_path / "metrics")
    apis = [
        ApiProcess(dict(os.environ), LOG_DIR / f"api-shared-{i}-{RUN_ID}.log", metrics_dir=shared)
        for i in range(2)
    ]
    for api in apis:
        api.start()
    try:
        bases = [api.base for api in apis]
        before = scrape(bases[0] + "/metrics")
        sent = drive(bases, settings, chats=12)
        for base in bases:
            after = scrape(base + "/metrics")
            for (method, route, status), n in sent.items():
                labels = {"method": method, "route": route, "status": status}
                grew = total([after], "dualwrite_requests_total", **labels) - total(
                    [before], "dualwrite_requests_total", **labels
                )
                assert grew == n, (base, labels, grew, n)
            assert enqueued([after]) - enqueued([before]) == 12
            # A fact of the database, once per scrape whatever the number of processes.
            behind = [s for s in after if s.name == "dualwrite_chats_behind"]
            assert len(behind) == 1
            with engine.connect() as connection:
                truth = connection.execute(
                    text(
                        "SELECT count(*) FROM copilot_chat_sync_state "
                        "WHERE applied_version < wanted_version"
                    )
                ).scalar_one()
            assert behind[0].value == truth
            assert not any(s.name.startswith(WORKER_SERIES) for s in after)
        # Each process wrote its own counts; the sum of their published jobs ran down to 0.
        writers = {p.stem.split("_")[1] for p in shared.glob("counter_*.db")}
        assert {str(api.pid) for api in apis} <= writers
        wait_until(
            lambda: total([scrape(bases[1] + "/metrics")], "dualwrite_publish_buffered") == 0,
            timeout=30,
        )
    finally:
        for api in apis:
            api.stop()


def test_uvicorn_workers_export_the_same_totals_whichever_answers(
    settings: Settings, tmp_path: Path
) -> None:
    """`uvicorn --workers 2`: every scrape, answered by either worker process, shows the
    totals of both."""
    directory = fresh_directory(tmp_path / "metrics")
    api = ApiProcess(
        dict(os.environ), LOG_DIR / f"api-workers-{RUN_ID}.log", workers=2, metrics_dir=directory
    ).start()
    try:
        # Both worker processes have started (each writes its files when it imports the app).
        wait_until(lambda: len({p.name for p in directory.glob("counter_*.db")}) >= 2, 60)
        before = scrape(api.base + "/metrics")
        sent = drive([api.base], settings, chats=10)
        for _ in range(6):  # on connections of their own, so either process may answer
            after = scrape(api.base + "/metrics")
            for (method, route, status), n in sent.items():
                labels = {"method": method, "route": route, "status": status}
                grew = total([after], "dualwrite_requests_total", **labels) - total(
                    [before], "dualwrite_requests_total", **labels
                )
                assert grew == n, (labels, grew, n)
            assert enqueued([after]) - enqueued([before]) == 10
    finally:
        api.stop()


def test_independent_api_instances_sum_to_the_true_totals(
    settings: Settings, tmp_path: Path
) -> None:
    """Two API instances, each with a directory of its own, behind one scrape config: the sum
    of their scrapes is the number of requests and of published jobs, exactly."""
    apis = [
        ApiProcess(
            dict(os.environ),
            LOG_DIR / f"api-{i}-{RUN_ID}.log",
            metrics_dir=fresh_directory(tmp_path / f"metrics-{i}"),
        ).start()
        for i in range(2)
    ]
    try:
        sent = drive([api.base for api in apis], settings, chats=15)
        scrapes = [scrape(api.base + "/metrics") for api in apis]
        assert_requests(scrapes, sent)
        assert enqueued(scrapes) == 15
        assert total(scrapes, "dualwrite_enqueue_failures_total") == 0
        assert not any(s.name.startswith(WORKER_SERIES) for scraped in scrapes for s in scraped)
    finally:
        for api in apis:
            api.stop()


def test_failed_publishes_of_every_process_add_up(settings: Settings, tmp_path: Path) -> None:
    """Two API processes of one instance whose broker is gone: every append's publish fails in
    the process that took the request, and either process's scrape counts all of them."""
    shared = fresh_directory(tmp_path / "metrics")
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens
    apis = [
        ApiProcess(env, LOG_DIR / f"api-nobroker-{i}-{RUN_ID}.log", metrics_dir=shared).start()
        for i in range(2)
    ]
    try:
        drive([api.base for api in apis], settings, chats=8)  # every request still succeeds

        def failed() -> list[float] | None:
            counts = [
                total([scrape(api.base + "/metrics")], "dualwrite_enqueue_failures_total")
                for api in apis
            ]
            return counts if counts == [8, 8] else None

        wait_until(failed, timeout=60, interval=0.5, what="8 failures, in either scrape")
        scraped = scrape(apis[0].base + "/metrics")
        assert enqueued([scraped]) == 0
        # Both processes took appends, so both counted failures in files of their own.
        per_process = [
            total([samples_of(path)], "dualwrite_enqueue_failures_total")
            for path in shared.glob("counter_*.db")
        ]
        assert sorted(per_process) == [4, 4]
    finally:
        for api in apis:
            api.stop()


def samples_of(path: Path) -> list[Sample]:
    """The samples of one process's file, as prometheus_client reads it."""
    from prometheus_client.multiprocess import MultiProcessCollector

    merged = MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
    return [s for family in merged for s in family.samples]


def test_two_worker_nodes_each_export_their_own_syncs_labelled_by_node(
    broker: RedisServer, hooks: Path, settings: Settings, engine: Engine
) -> None:
    """Two real worker nodes on one broker: what their own /metrics serve adds up to the syncs
    they ran, per outcome, and to one lag observation per sync. One of them replaces its
    children after every task, as WORKER_MAX_TASKS_PER_CHILD does in production: the counts of
    its dead children stay in its sums."""
    nodes = [
        start_worker(broker, hooks, "node-a", WORKER_MAX_TASKS_PER_CHILD="1"),
        start_worker(broker, hooks, "node-b"),
    ]
    syncs = 24
    from fastapi.testclient import TestClient

    from app.main import create_app

    try:
        app = create_app(Settings(redis_url=broker.url))
        with TestClient(app) as client:
            chat_ids = []
            for _ in range(syncs):
                created = client.post("/chats", json={}, headers=headers(settings, "nodes"))
                chat_ids.append(created.json()["id"])
                appended = client.post(
                    f"/chats/{chat_ids[-1]}/messages",
                    json={"message": message("user")},
                    headers=headers(settings, "nodes"),
                )
                assert appended.status_code == 201, appended.text
            wait_converged(engine, chat_ids, timeout=120)
            api_scrape = samples(client.get("/metrics").text)
        app.state.engine.dispose()

        def counted() -> list[list[Sample]] | None:
            # A task is counted after its commit: poll until every sync shows.
            scrapes = [scrape(str(node.metrics_url)) for node in nodes]
            return scrapes if total(scrapes, "dualwrite_tasks_total") >= syncs else None

        scrapes = wait_until(counted, timeout=60, interval=0.2)
        assert total(scrapes, "dualwrite_tasks_total") == syncs
        assert total(scrapes, "dualwrite_tasks_total", outcome="applied") == syncs
        assert total(scrapes, "dualwrite_sync_lag_seconds_count") == syncs
        assert total(scrapes, "dualwrite_sync_lag_seconds_bucket", le="+Inf") == syncs
        assert total(scrapes, "dualwrite_rows_written_total", kind="inserted") == syncs
        for node, scraped in zip(nodes, scrapes, strict=True):
            labels = {s.labels.get("node") for s in scraped}
            assert labels == {f"{node.name}@{os.uname().nodename}"}, labels
        # node-a's dead children were folded into its archive: its files do not pile up.
        assert nodes[0].metrics_dir is not None
        left = sorted(p.name for p in nodes[0].metrics_dir.glob("counter_*.db"))
        assert "counter_archive.db" in left and len(left) <= 4, left  # main, 2 children, archive
        # The API counted none of it.
        assert not any(s.name.startswith(WORKER_SERIES) for s in api_scrape)
        assert enqueued([api_scrape]) >= syncs
    finally:
        for node in nodes:
            node.stop()


def test_counts_of_exited_processes_fold_into_one_archive(tmp_path: Path) -> None:
    """Processes that counted and exited (recycled children) leave their files; a scrape folds
    them into one archive per type and keeps every count."""
    directory = fresh_directory(tmp_path / "metrics")
    program = (
        "from prometheus_client import Counter, Histogram\n"
        "Counter('fold_things', 'h', ['kind']).labels('a').inc(3)\n"
        "Histogram('fold_seconds', 'h', buckets=(1, 5)).observe(2)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}

    def run() -> None:
        subprocess.run([sys.executable, "-c", program], env=env, check=True)

    def read(collector: CompactingCollector) -> dict[str, float]:
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in collector.collect()
            for s in family.samples
        }

    collector = CompactingCollector(str(directory))
    CollectorRegistry().register(collector)
    for _ in range(2):
        run()
    first = read(collector)
    assert first["fold_things_total[('kind', 'a')]"] == 6
    assert first["fold_seconds_count[]"] == 2
    assert first["fold_seconds_bucket[('le', '5.0')]"] == 2
    assert first["fold_seconds_bucket[('le', '1.0')]"] == 0
    assert sorted(p.name for p in directory.glob("*.db")) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]
    run()
    again = read(collector)
    assert again["fold_things_total[('kind', 'a')]"] == 9
    assert again["fold_seconds_sum[]"] == 6
    assert len(list(directory.glob("*.db"))) == 2


def test_processes_scraping_one_directory_at_once_fold_it_once(tmp_path: Path) -> None:
    """The processes of one API instance answer scrapes concurrently, each folding the files of
    the processes that died meanwhile: every read sees each count exactly once, so no scrape
    shows a total that a later one takes back, and nothing is counted twice at the end."""
    directory = fresh_directory(tmp_path / "metrics")
    done = tmp_path / "done"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    dying = (
        "import os, sys\n"
        "for _ in range(60):\n"
        "    if os.fork() == 0:\n"
        "        from prometheus_client import Counter\n"
        "        Counter('fold_things', 'h').inc(2)\n"
        "        os._exit(0)\n"
        "    os.wait()\n"
        "open(sys.argv[1], 'w').close()\n"
    )
    scraper = (
        "import os, sys\n"
        "from app.metrics import CompactingCollector\n"
        "collector = CompactingCollector(sys.argv[1])\n"
        "while True:\n"
        "    last = os.path.exists(sys.argv[2])\n"
        "    print(sum(s.value for f in collector.collect() for s in f.samples"
        " if s.name == 'fold_things_total'), flush=True)\n"
        "    if last:\n"
        "        break\n"
    )
    root = Path(__file__).resolve().parents[1]
    scrapers = [
        subprocess.Popen(
            [sys.executable, "-c", scraper, str(directory), str(done)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for _ in range(3)
    ]
    subprocess.run([sys.executable, "-c", dying, str(done)], env=env, check=True)
    for p in scrapers:
        seen = [float(line) for line in p.communicate(timeout=120)[0].split()]
        assert p.returncode == 0
        assert seen == sorted(seen), seen  # never more than a later scrape
        assert seen[-1] == 120
    assert [p.name for p in directory.glob("*.db")] == ["counter_archive.db"]
