#!/usr/bin/env bash
# Runs one benchmark, or all of them: scripts/bench.sh NAME|all [--quick] [options]
# NAME is one of the modules of bench/ below. Each prints its figures, each with its reference
# measured in the same run and its verdict (and writes plots and raw data to bench/out/).
# --quick runs tiny sizes: it checks that the scripts work, and its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL="overhead lag throughput drain reconcile reads memory chaos migration cutover hostile pool append_sync scale metrics_cost broker append_cost"
name=${1:?usage: scripts/bench.sh NAME|all [--quick] (NAME: $ALL)}
shift
scripts/setup.sh
scripts/services.sh
if [ "$name" = all ]; then
    for bench in $ALL; do
        echo "== $bench"
        .venv/bin/python -m "bench.$bench" "$@"
    done
else
    exec .venv/bin/python -m "bench.$name" "$@"
fi
