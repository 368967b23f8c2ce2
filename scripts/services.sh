#!/usr/bin/env bash
# Checks that PostgreSQL, Redis and RabbitMQ answer on this machine; starts them (as root) when
# they do not.
# Prints one plain line per service it cannot reach, with the command that starts it.
set -u

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
# The AMQP listener accepts connections: it opens once the node has booted.
rabbit_up() { timeout 2 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; }

PG_START='pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
RABBIT_START='rabbitmq-server -detached'
REDIS_START='redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'

wait_for() {  # wait_for CHECK SECONDS
    for _ in $(seq 1 "$2"); do "$1" && return 0; sleep 1; done
    return 1
}

status=0
if ! pg_up; then
    if [ "$(id -u)" = 0 ] && [ -d /etc/postgresql ]; then
        eval "$PG_START" >/dev/null 2>&1 || true
    fi
    if ! wait_for pg_up 30; then
        echo "PostgreSQL does not answer on 127.0.0.1:5432; start it with: $PG_START"
        status=1
    fi
fi
if ! redis_up; then
    if [ "$(id -u)" = 0 ] && command -v redis-server >/dev/null; then
        mkdir -p /var/lib/redis /var/log/redis
        eval "$REDIS_START" >/dev/null 2>&1 || true
    fi
    if ! wait_for redis_up 15; then
        echo "Redis does not answer on 127.0.0.1:6379; start it with: $REDIS_START"
        status=1
    fi
fi
if ! rabbit_up; then
    if [ "$(id -u)" = 0 ] && command -v rabbitmq-server >/dev/null; then
        eval "$RABBIT_START" >/dev/null 2>&1 || true
    fi
    if ! wait_for rabbit_up 90; then
        echo "RabbitMQ does not answer on 127.0.0.1:5672; start it with: $RABBIT_START"
        status=1
    fi
fi
exit $status
