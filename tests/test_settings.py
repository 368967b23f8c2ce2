"""Settings refuse what would make the service unsafe, at start-up, saying which and why."""

from __future__ import annotations

import os
import secrets

import pytest
from pydantic import ValidationError

from app.settings import Settings
from harness.processes import ApiProcess
from tests.conftest import LOG_DIR, RUN_ID


@pytest.mark.parametrize(
    "secret",
    ["0123456789abcdef", "x" * 31, "é" * 15],  # 16 and 31 characters; 30 bytes
)
def test_a_signing_secret_shorter_than_32_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ValidationError, match="AUTH_SECRET must be at least 32 bytes for HS256"):
        Settings(auth_secret=secret)


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16, secrets.token_hex(32)])
def test_a_signing_secret_of_32_bytes_or_more_is_accepted(secret: str) -> None:
    assert Settings(auth_secret=secret).signing_secret == secret


def test_the_api_with_a_short_secret_exits_at_start_up_naming_it() -> None:
    short = {**os.environ, "AUTH_SECRET": "0123456789abcdef"}
    api = ApiProcess(short, LOG_DIR / f"api-short-secret-{RUN_ID}.log")
    try:
        with pytest.raises(AssertionError, match="exited with") as failed:
            api.start(timeout=60)
    finally:
        api.stop()
    assert "AUTH_SECRET must be at least 32 bytes for HS256 (it has 16)" in str(failed.value)


def test_without_broker_url_the_broker_is_redis_url_as_before() -> None:
    settings = Settings(redis_url="redis://cache:6379/3")
    assert settings.broker == "redis://cache:6379/3"
    assert settings.broker_kind == "redis" and settings.redis == "redis://cache:6379/3"
    assert Settings(redis_url=None).broker == "redis://127.0.0.1:6379/0"


def test_an_amqp_broker_needs_no_redis() -> None:
    settings = Settings(broker_url="amqp://u:p@rabbit:5672/vh", redis_url=None)
    assert settings.broker_kind == "amqp" and settings.redis is None
    # A REDIS_URL beside RabbitMQ is for what is not the broker (the worker metrics) only.
    both = Settings(broker_url="amqp://u:p@rabbit:5672/vh", redis_url="redis://cache:6379/0")
    assert both.broker == "amqp://u:p@rabbit:5672/vh" and both.redis == "redis://cache:6379/0"


def test_the_celery_config_of_an_amqp_broker_uses_quorum_queues_and_confirms() -> None:
    from app import topology

    settings = Settings(broker_url="amqp://rabbit//", redis_url=None)
    options = topology.celery_options(settings)
    assert options["broker_url"] == "amqp://rabbit//"
    assert options["task_default_queue_type"] == "quorum"
    assert {q.queue_arguments["x-queue-type"] for q in options["task_queues"]} == {"quorum"}
    assert {q.exchange.type for q in options["task_queues"]} == {"topic"}
    assert options["broker_transport_options"] == {"confirm_publish": True}
    sends = topology.transport_options(settings, producer=True)
    assert sends["read_timeout"] == settings.publish_socket_timeout_seconds
    # Celery's delay queues count whole seconds and refuse a delay that rounds down to none.
    assert topology.countdown(settings, 0.3) == 1.0
    assert topology.countdown(Settings(redis_url="redis://r/0"), 0.3) == 0.3


@pytest.mark.parametrize("url", ["http://rabbit/", "kafka://k:9092", "rabbit:5672"])
def test_a_broker_url_of_another_kind_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="BROKER_URL must be a redis:// or amqp:// URL"):
        Settings(broker_url=url)


def test_an_amqp_broker_refuses_a_redelivery_cap_above_the_queues_delivery_limit() -> None:
    with pytest.raises(ValidationError, match="MAX_REDELIVERIES must be below 19 with RabbitMQ"):
        Settings(broker_url="amqp://rabbit//", max_redeliveries=19)
    Settings(broker_url="amqp://rabbit//", max_redeliveries=18)


def test_an_amqp_broker_needs_a_consumer_timeout_above_the_task_time_limit() -> None:
    with pytest.raises(ValidationError, match="BROKER_CONSUMER_TIMEOUT_SECONDS"):
        Settings(broker_url="amqp://rabbit//", broker_consumer_timeout_seconds=100)
