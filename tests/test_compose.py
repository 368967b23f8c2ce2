"""docker-compose.yml and the Dockerfile agree with the code they start.

Nothing here runs a container, a database or a broker: each check imports what a service names or
reads the file a command relies on, so renaming a queue, a setting or an entry point fails here
instead of in a deployment.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from alembic.config import Config
from alembic.script import ScriptDirectory
from celery import Celery
from celery.app.utils import find_app
from flower.options import options as flower_options

import tasks
from app.main import create_app
from app.settings import Settings
from tasks.queues import Queue

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# Services that run the project's image; postgres, redis, rabbitmq and prometheus run stock
# images.
APP_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)

# Variables in app services that are read by a tool, not by `app.settings.Settings`.
NOT_SETTINGS_PREFIXES = ("FLOWER_", "POSTGRES_", "WEB_CONCURRENCY")
# DESIGN.md section 7: the environment every process of the service is configured through (its
# log format too: every process logs in the one an operator picks).
REQUIRED_SETTINGS = {
    "DATABASE_URL",
    "BROKER_URL",
    "REDIS_URL",
    "AUTH_SECRET",
    "DUALWRITE_PHASE",
    "LOG_FORMAT",
}

# Whichever broker runs: Redis by default, RabbitMQ with its profile (each dependency on a broker
# is `required: false`, so that the one not started does not hold the services back).
BROKERS = {"redis": "service_healthy", "rabbitmq": "service_healthy"}
EXPECTED_DEPENDS_ON = {
    "migrate": {"postgres": "service_healthy"},
    "api": {"migrate": "service_completed_successfully", **BROKERS},
    "worker": {"migrate": "service_completed_successfully", **BROKERS},
    "worker-maintenance": {"migrate": "service_completed_successfully", **BROKERS},
    "beat": BROKERS,
    "flower": {**BROKERS, "worker": "service_healthy"},
}
# The README's and the compose file's own RabbitMQ set-up.
RABBITMQ_URL = "amqp://chat:chat@rabbitmq:5672/"
# Where the image keeps what must outlive a container: a named volume is mounted on each.
STATE_DIRS = {"beat": "/var/lib/chat-dualwrite/beat", "flower": "/var/lib/chat-dualwrite/flower"}


def command(name: str) -> list[str]:
    value = SERVICES[name].get("command", [])
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def option(args: list[str], *names: str) -> str:
    """The value of the first of `names` in `args`, given as `--name value` or `--name=value`."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name:
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    raise AssertionError(f"none of {names} in {args}")


def environment(name: str) -> dict[str, str]:
    value = SERVICES[name].get("environment", {})
    if isinstance(value, list):
        value = dict(item.split("=", 1) for item in value)
    return {key: str(item) for key, item in value.items()}


def unset_value(value: str) -> str | None:
    """What compose passes when the variable in `value` is unset: the literal itself, the default
    of `${NAME:-default}`, or None when it must come from the operator (`${NAME:?message}`)."""
    match = re.fullmatch(r"\$\{\w+:?-(.*)\}", value)
    if match:
        return match.group(1)
    return None if "${" in value else value


def depends_on(name: str) -> dict[str, str]:
    value = SERVICES[name].get("depends_on", {})
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {target: spec.get("condition", "service_started") for target, spec in value.items()}


def healthcheck(name: str) -> str:
    test = SERVICES[name]["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    return " ".join(arg for arg in test if arg not in ("CMD", "CMD-SHELL"))


def published_ports(name: str) -> list[tuple[str, str]]:
    """(host address, container port) of each published port, in the short `ip:host:container`
    syntax; a port without an address has host address ''."""
    ports = []
    for mapping in SERVICES[name].get("ports", []):
        parts = str(mapping).split(":")
        ports.append((parts[0] if len(parts) == 3 else "", parts[-1]))
    return ports


def seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def celery_services() -> list[str]:
    return [name for name in SERVICES if command(name)[:1] == ["celery"]]


def celery_program(args: list[str]) -> str:
    """`worker`, `beat` or `flower`: the first argument that is neither an option nor the app."""
    app = option(args, "-A", "--app")
    return next(arg for arg in args[1:] if not arg.startswith("-") and arg != app)


def worker_services() -> list[str]:
    return [name for name in celery_services() if celery_program(command(name)) == "worker"]


def queues_of(name: str) -> set[str]:
    return set(option(command(name), "-Q", "--queues").split(","))


def worker_queues() -> set[str]:
    """Every queue some worker service consumes."""
    return set().union(*(queues_of(name) for name in worker_services()))


def uvicorn_target() -> tuple[str, str]:
    """The module and attribute of the API's `uvicorn module:attribute`."""
    args = command("api")
    assert args[0] == "uvicorn"
    module, attribute = next(arg for arg in args[1:] if not arg.startswith("-")).split(":")
    return module, attribute


def source_path(module: str) -> str:
    """The top-level path in the repository that holds `module`: a package or a `.py` file."""
    top = module.split(".")[0]
    return top if (ROOT / top).is_dir() else top + ".py"


def setting_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {(prefix + field).upper() for field in Settings.model_fields}


@pytest.mark.parametrize("name", celery_services())
def test_celery_services_name_the_celery_app(name: str) -> None:
    app = find_app(option(command(name), "-A", "--app"))
    assert isinstance(app, Celery)
    assert app is tasks.celery


def test_each_celery_program_runs_in_exactly_one_service_but_the_workers() -> None:
    # A second beat would publish every periodic job twice; workers split the queues.
    programs = sorted(celery_program(command(name)) for name in celery_services())
    assert programs == ["beat", "flower", "worker", "worker"]


def test_the_bulk_passes_run_on_a_maintenance_worker_apart_from_the_sync_workers() -> None:
    # A long backfill or reconcile chunk must never hold a slot that a chat's sync needs.
    from app.task_names import BACKFILL_CHUNK, RECONCILE_CHUNK, ROUTES

    assert ROUTES[BACKFILL_CHUNK] is Queue.MAINTENANCE
    assert ROUTES[RECONCILE_CHUNK] is Queue.MAINTENANCE
    assert tasks.celery.tasks[BACKFILL_CHUNK].queue == Queue.MAINTENANCE.value
    assert tasks.celery.tasks[RECONCILE_CHUNK].queue == Queue.MAINTENANCE.value
    assert queues_of("worker") == {Queue.SYNC.value}
    assert queues_of("worker-maintenance") == {Queue.MAINTENANCE.value}


def test_worker_consumes_every_queue() -> None:
    assert worker_queues() == {queue.value for queue in Queue}


def test_tasks_are_routed_only_to_consumed_queues() -> None:
    # A task published to a queue no worker reads waits in Redis forever.
    conf = tasks.celery.conf
    used = {conf.task_default_queue}
    used |= {queue.name for queue in conf.task_queues}
    used |= {route["queue"] for route in conf.task_routes.values()}
    used |= {
        task.queue
        for task_name, task in tasks.celery.tasks.items()
        if not task_name.startswith("celery.") and task.queue
    }
    assert used <= worker_queues()


def test_api_serves_the_asgi_app(monkeypatch: pytest.MonkeyPatch) -> None:
    module_name, attribute = uvicorn_target()
    module = importlib.import_module(module_name)
    assert callable(module.create_app)
    if attribute in vars(module):
        return
    # The app is built on first access and that needs AUTH_SECRET: check that the lazy lookup
    # answers to this name by having it build a stand-in.
    built = object()
    monkeypatch.setattr(module, "create_app", lambda: built)
    try:
        assert getattr(module, attribute) is built
    finally:
        vars(module).pop(attribute, None)


def healthcheck_url(name: str) -> Any:
    match = re.search(r"http://[^'\"\s]+", healthcheck(name))
    assert match, healthcheck(name)
    return urlsplit(match.group())


def test_api_port_and_healthcheck_reach_the_readiness_route() -> None:
    port = option(command("api"), "--port")
    assert published_ports("api") == [("127.0.0.1", port)]
    url = healthcheck_url("api")
    assert url.hostname in ("127.0.0.1", "localhost")
    assert str(url.port) == port
    # Readiness, not liveness: compose holds back what depends on the API until it can serve.
    assert url.path == "/readyz"
    # Building the app creates an engine but opens no connection.
    api = create_app(
        Settings(auth_secret="a-real-secret-for-tests-" + "x" * 16),
        send_many=lambda jobs: [None] * len(jobs),
    )
    try:
        assert url.path in {getattr(route, "path", None) for route in api.routes}
    finally:
        api.state.engine.dispose()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_set_only_settings(name: str) -> None:
    names = {key for key in environment(name) if not key.startswith(NOT_SETTINGS_PREFIXES)}
    assert names <= setting_names()
    assert names >= REQUIRED_SETTINGS


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_defaults_are_valid_settings(name: str) -> None:
    values = {
        key.lower(): unset_value(value)
        for key, value in environment(name).items()
        if not key.startswith(NOT_SETTINGS_PREFIXES)
    }
    Settings(**{key: value for key, value in values.items() if value is not None})  # type: ignore[arg-type]


def test_flower_variables_are_flower_options() -> None:
    # Flower exits on a FLOWER_* variable that names none of its options.
    for name in APP_SERVICES:
        for key in environment(name):
            if key.startswith("FLOWER_"):
                assert key.removeprefix("FLOWER_").lower() in flower_options, key


def test_urls_point_at_the_compose_services() -> None:
    postgres = environment("postgres")
    for name in APP_SERVICES:
        env = environment(name)
        database = urlsplit(env["DATABASE_URL"])
        assert database.scheme == "postgresql"
        assert database.hostname == "postgres"
        assert database.port == 5432
        assert database.username == postgres["POSTGRES_USER"]
        assert database.password == postgres["POSTGRES_PASSWORD"]
        assert database.path == "/" + postgres["POSTGRES_DB"]
        assert unset_value(env["BROKER_URL"]) == ""  # unset, the broker is REDIS_URL
        broker = urlsplit(unset_value(env["REDIS_URL"]))
        assert broker.scheme == "redis"
        assert broker.hostname == "redis"
    rabbit = environment("rabbitmq")
    amqp = urlsplit(RABBITMQ_URL)
    assert (amqp.username, amqp.password) == (
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
    )
    assert amqp.hostname == "rabbitmq" == SERVICES["rabbitmq"]["hostname"]
    assert RABBITMQ_URL in (ROOT / "docker-compose.yml").read_text()


def test_with_rabbitmq_the_services_need_no_redis() -> None:
    settings = Settings(broker_url=RABBITMQ_URL, redis_url="")
    assert settings.broker_kind == "amqp" and settings.redis is None
    assert SERVICES["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert "profiles" not in SERVICES["redis"]  # Redis stays the default broker
    for name in APP_SERVICES:
        for target in ("redis", "rabbitmq"):
            spec = SERVICES[name].get("depends_on", {}).get(target)
            assert spec is None or spec.get("required") is False, (name, target)


def test_migrate_upgrades_a_single_head_from_the_root_alembic_ini() -> None:
    assert command("migrate") == ["alembic", "upgrade", "head"]
    config = Config(str(ROOT / "alembic.ini"))
    location = config.get_main_option("script_location")
    assert location
    assert (ROOT / location / "env.py").is_file()
    config.set_main_option("script_location", str(ROOT / location))
    assert len(ScriptDirectory.from_config(config).get_heads()) == 1


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_services_wait_for_what_they_need(name: str) -> None:
    assert depends_on(name) == EXPECTED_DEPENDS_ON.get(name, {})
    for target, condition in depends_on(name).items():
        assert target in SERVICES
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[target]
        if condition == "service_completed_successfully":
            # A one-shot that compose restarts never completes.
            assert SERVICES[target].get("restart", "no") == "no"


@pytest.mark.parametrize(
    ("name", "probe"),
    [
        ("postgres", "pg_isready"),
        ("redis", "redis-cli ping"),
        ("rabbitmq", "rabbitmq-diagnostics"),
        ("api", "urllib.request"),
        ("worker", "inspect ping"),
        ("worker-maintenance", "inspect ping"),
        ("beat", "find "),
        ("flower", "urllib.request"),
    ],
)
def test_healthchecks(name: str, probe: str) -> None:
    assert probe in healthcheck(name)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_bounded_healthcheck(name: str) -> None:
    if SERVICES[name].get("restart", "no") == "no":
        return  # a one-shot (the migration): compose waits for it to complete instead
    check = SERVICES[name]["healthcheck"]
    assert seconds(check["timeout"]) <= seconds(check["interval"])
    assert check.get("retries", 3) >= 1


def celery_service(program: str) -> str:
    """The service that runs this celery program: the one named after it where several do (the
    sync `worker` beside `worker-maintenance`)."""
    names = [name for name in celery_services() if celery_program(command(name)) == program]
    if program in names:
        return program
    (name,) = names
    return name


@pytest.mark.parametrize("name", ["worker", "worker-maintenance"])
def test_worker_healthcheck_pings_the_workers_own_node(name: str) -> None:
    args = shlex.split(healthcheck(name))
    # The same Celery app as the worker, and its `inspect ping`.
    assert args[0] == "celery"
    assert option(args, "-A", "--app") == option(command(name), "-A", "--app")
    assert celery_program(args) == "inspect" and "ping" in args
    # `%h` in the node name is the hostname, `$HOSTNAME` in the container (`$$` in compose).
    node = option(command(name), "-n", "--hostname")
    assert option(args, "-d", "--destination") == node.replace("%h", "$$HOSTNAME")
    # The ping gives up before compose gives up on the healthcheck.
    limit = seconds(SERVICES[name]["healthcheck"]["timeout"])
    assert float(option(args, "-t", "--timeout")) < limit


def named_volumes(name: str) -> dict[str, str]:
    """Mount target -> named volume, for the service's volumes declared at the top level."""
    mounts = {}
    for volume in SERVICES[name].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        assert source in (COMPOSE.get("volumes") or {}), f"{name}: {source} is not a named volume"
        mounts[target] = source
    return mounts


def test_beat_keeps_its_schedule_on_a_volume_and_its_healthcheck_watches_it() -> None:
    import celeryconfig

    name = celery_service("beat")
    schedule = Path(option(command(name), "-s", "--schedule"))
    assert schedule.parent.as_posix() == STATE_DIRS["beat"]
    assert STATE_DIRS["beat"] in named_volumes(name)
    # The healthcheck looks at that file (the shelve may add a suffix) and wants it recent.
    args = shlex.split(healthcheck(name))
    assert args[:2] == ["find", STATE_DIRS["beat"]]
    assert option(args, "-name") == schedule.name + "*"
    minutes = int(option(args, "-mmin").lstrip("-"))
    # Beat writes the file after each job it sends: the sweep's interval bounds the age.
    assert celeryconfig.beat_sync_every == 1
    sweep = Settings.model_fields["sweep_interval_seconds"].default
    assert minutes * 60 >= 3 * sweep


def test_flower_keeps_its_state_on_a_volume_and_its_healthcheck_uses_its_auth() -> None:
    name = celery_service("flower")
    env = environment(name)
    assert env["FLOWER_PERSISTENT"].lower() in ("true", "1", "yes")
    assert Path(env["FLOWER_DB"]).parent.as_posix() == STATE_DIRS["flower"]
    assert STATE_DIRS["flower"] in named_volumes(name)
    assert int(env["FLOWER_STATE_SAVE_INTERVAL"]) > 0
    # The probe authenticates with the variable Flower reads its credentials from.
    assert "os.environ['FLOWER_BASIC_AUTH']" in healthcheck(name)
    assert "FLOWER_BASIC_AUTH" in env
    url = healthcheck_url(name)
    assert str(url.port) == option(command(name), "--port")
    # A route behind Flower's auth (its `/healthcheck` checks none).
    assert url.path.startswith("/api/")


def test_state_directories_belong_to_the_image_user() -> None:
    # A named volume takes its owner from the image's directory when it is first mounted.
    user = [i[1] for i in dockerfile() if i[0].upper() == "USER"][-1].split(":")[0]
    runs = [" ".join(i[1:]) for i in dockerfile() if i[0].upper() == "RUN"]
    for path in STATE_DIRS.values():
        assert any("mkdir -p" in run and path in run for run in runs), path
    assert any(f"chown -R {user} /var/lib/chat-dualwrite" in run for run in runs)


@pytest.mark.parametrize("name", ["worker", "worker-maintenance"])
def test_worker_concurrency_and_recycling_come_from_the_settings(name: str) -> None:
    # A `-c` or `--max-tasks-per-child` on the command line would override the settings.
    args = command(name)
    for flag in ("-c", "--concurrency", "--max-tasks-per-child", "--max-memory-per-child"):
        assert not any(arg == flag or arg.startswith(flag + "=") for arg in args), flag
    conf = tasks.celery.conf
    defaults = Settings()
    assert conf.worker_concurrency == defaults.worker_concurrency
    assert conf.worker_max_tasks_per_child == defaults.worker_max_tasks_per_child
    assert conf.worker_max_memory_per_child == defaults.worker_max_memory_per_child_kb


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_stay_on_localhost(name: str) -> None:
    for address, _ in published_ports(name):
        assert address == "127.0.0.1"


def test_flower_listens_on_its_published_port() -> None:
    port = option(command("flower"), "--port")
    assert published_ports("flower") == [("127.0.0.1", port)]


def test_redis_keeps_queued_tasks() -> None:
    args = " ".join(command("redis"))
    assert "--maxmemory-policy noeviction" in args
    assert "--appendonly yes" in args


@pytest.mark.parametrize("worker", ["worker", "worker-maintenance"])
def test_worker_stop_grace_outlasts_the_task_time_limit(worker: str) -> None:
    limit = Settings.model_fields["task_time_limit_seconds"].default
    assert seconds(SERVICES[worker]["stop_grace_period"]) > limit


def dockerfile() -> list[list[str]]:
    """The Dockerfile's instructions as argument lists, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_image_copies_what_the_services_need() -> None:
    copied = {
        source.rstrip("/")
        for instruction in dockerfile()
        if instruction[0].upper() == "COPY"
        for source in [arg for arg in instruction[1:] if not arg.startswith("--")][:-1]
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packaging = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"], "alembic.ini"}
    needed |= {package.split(".")[0] for package in packaging["packages"]}
    needed |= {module + ".py" for module in packaging["py-modules"]}
    needed.add(Config(str(ROOT / "alembic.ini")).get_main_option("script_location") or "")
    modules = {option(command(name), "-A", "--app") for name in celery_services()}
    modules.add(uvicorn_target()[0])
    needed |= {source_path(module) for module in modules}
    for path in needed:
        assert (ROOT / path).exists(), path
    assert needed <= copied
    assert ["RUN", "pip", "install", "."] in [i[:4] for i in dockerfile()]


def test_image_runs_as_a_non_root_user() -> None:
    users = [instruction[1] for instruction in dockerfile() if instruction[0].upper() == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")


PROMETHEUS: dict[str, Any] = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())


def scrape_job(name: str) -> dict[str, Any]:
    (job,) = [job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == name]
    found: dict[str, Any] = job
    return found


WORKER_SERVICES = [name for name in SERVICES if name.startswith("worker")]


@pytest.mark.parametrize("name", ["api", *WORKER_SERVICES])
def test_metrics_files_start_empty_in_every_container(name: str) -> None:
    # Counts of an earlier container (or another process group) must not add to this one's.
    directory = environment(name)["PROMETHEUS_MULTIPROC_DIR"]
    assert directory in SERVICES[name].get("tmpfs", [])


def test_prometheus_scrapes_each_api_instance_and_each_worker_node() -> None:
    assert {"worker", "worker-maintenance"} <= set(WORKER_SERVICES)
    ports = {
        environment(name).get("WORKER_METRICS_PORT")
        or str(Settings.model_fields["worker_metrics_port"].default)
        for name in WORKER_SERVICES
    }
    (worker_port,) = ports  # one scrape port for every worker service
    for job, services, port in [
        ("dualwrite-api", ["api"], option(command("api"), "--port")),
        ("dualwrite-worker", WORKER_SERVICES, worker_port),
    ]:
        # One target per replica (a DNS A record each), never one address in front of them.
        (discovery,) = scrape_job(job)["dns_sd_configs"]
        assert sorted(discovery["names"]) == sorted(services) and discovery["type"] == "A"
        assert str(discovery["port"]) == port
    for name in WORKER_SERVICES:
        assert worker_port in SERVICES[name]["expose"]
    (flower,) = scrape_job("flower")["static_configs"]
    assert flower["targets"] == [f"flower:{option(command('flower'), '--port')}"]


def test_prometheus_loads_this_config_and_the_alert_rules() -> None:
    args = command("prometheus")
    config = Path(option(args, "--config.file"))
    assert f"./monitoring:{config.parent.as_posix()}:ro" in SERVICES["prometheus"]["volumes"]
    assert config.name == "prometheus.yml"
    for rules in PROMETHEUS["rule_files"]:
        assert (ROOT / "monitoring" / rules).is_file()
    # Every job an alert names is one this config scrapes.
    alerts = (ROOT / "monitoring" / "alerts.yml").read_text()
    jobs = {job["job_name"] for job in PROMETHEUS["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', alerts)) <= jobs
