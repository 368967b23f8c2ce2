# One image for every process of the service: API, migrations, Celery worker, beat and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/chat-dualwrite

COPY pyproject.toml README.md ./
COPY celeryconfig.py ./
COPY app/ app/
COPY tasks/ tasks/
RUN pip install . && rm -rf build *.egg-info

# Migrations are not part of the package; `alembic upgrade head` runs from this directory.
COPY alembic.ini ./
COPY migrations/ migrations/

# The code stays owned by root, so the service cannot rewrite it.
RUN useradd --create-home --uid 10001 chat
# Mount points of beat's schedule and Flower's state: a named volume takes its owner from the
# image's directory, so the app user can write there.
RUN mkdir -p /var/lib/chat-dualwrite/beat /var/lib/chat-dualwrite/flower \
    && chown -R chat /var/lib/chat-dualwrite
USER chat

# The API; 9540 is a worker node's metrics (WORKER_METRICS_PORT).
EXPOSE 8000 9540
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
