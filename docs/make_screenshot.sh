#!/usr/bin/env bash
# Screenshots of `mlflow ui` for the README, taken in headless Chromium (Debian's `chromium`):
#   docs/img/mlflow_ui_sweep.png         MLflow's comparison of the three runs of the newest
#                                        task2_2 sweep (python -m src.train -m experiment=task2_2)
#   docs/img/mlflow_ui_sweep_parent.png  that sweep's parent run showing its comparison figure
# Run from anywhere after the sweep has run (docs/make_figures.py runs it):
#   bash docs/make_screenshot.sh
# The UI listens on 127.0.0.1 only and is stopped (by its process id) when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PORT=${PORT:-5055}
STORE=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}
URL=http://127.0.0.1:$PORT

# The sweep: newest task2_2 parent without a seed sweep, and its children.
read -r EXPERIMENT PARENT CHILDREN < <(.venv/bin/python - "$STORE" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name("report-task2_2")
if experiment is None:
    sys.exit("no MLflow experiment report-task2_2: run python -m src.train -m experiment=task2_2")
runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
parents = [
    r for r in runs
    if "mlflow.parentRunId" not in r.data.tags and "seed=" not in r.data.tags.get("overrides", "")
]
if not parents:
    sys.exit("no task2_2 sweep in the store: run python -m src.train -m experiment=task2_2")
parent = parents[0].info.run_id
children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
print(experiment.experiment_id, parent, ",".join(f'%22{c}%22' for c in children))
EOF
)

# Telemetry off: the UI must not try to reach anything beyond this machine.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
PROFILE=$(mktemp -d)
# A new session, so the UI and its workers form one process group whose id is the pid the
# shell records before exec'ing into the UI; the trap ends that group and only that group.
setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$PROFILE/ui.pid" \
    .venv/bin/mlflow ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" \
    > "$PROFILE/ui.log" 2>&1 &
trap 'kill -- -"$(cat "$PROFILE/ui.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$PROFILE"' EXIT
for _ in $(seq 60); do
    curl -sf -o /dev/null "$URL/" && break
    sleep 1
done
curl -sf -o /dev/null "$URL/" || { echo "mlflow ui did not start on $URL" >&2; exit 1; }

shoot() {  # shoot <output png> <url>
    local raw="$PROFILE/shot.png"
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$PROFILE/chromium" --virtual-time-budget=20000 --hide-scrollbars \
        --screenshot="$raw" --window-size=1400,900 "$2" 2>/dev/null
    # A 256-colour palette keeps a screenshot of flat UI colours well under 150 KB; written
    # beside the target and renamed into place.
    .venv/bin/python -c "import sys; from PIL import Image; \
Image.open(sys.argv[1]).convert('RGB').quantize(256, method=Image.Quantize.FASTOCTREE).save(sys.argv[2], 'PNG', optimize=True)" \
        "$raw" "$1.tmp"
    mv -f "$1.tmp" "$1"
    echo "$1: $(stat -c %s "$1") bytes"
}
mkdir -p docs/img
shoot docs/img/mlflow_ui_sweep.png \
    "$URL/#/compare-runs?runs=[$CHILDREN]&experiments=[%22$EXPERIMENT%22]"
shoot docs/img/mlflow_ui_sweep_parent.png \
    "$URL/#/experiments/$EXPERIMENT/runs/$PARENT/artifacts/plots/sweep_comparison.png"
