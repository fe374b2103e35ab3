#!/usr/bin/env bash
# Screenshots of `mlflow ui` for the README, taken in headless Chromium (Debian's `chromium`),
# in MLflow's model-training view, of the newest task2_2 sweep (python -m src.train
# experiment=task2_2), through the addresses the sweep's last lines print:
#   docs/img/mlflow_ui_sweep.png         its jobs side by side in the runs table (the view the
#                                        sweep shares: swept params and final metrics as columns)
#   docs/img/mlflow_ui_sweep_charts.png  the same jobs' charts: the curves first
#   docs/img/mlflow_ui_sweep_parent.png  its parent run: the best job's metrics, the swept values
# docs/screenshot.py drives Chromium (it closes the MLflow Assistant panel first).
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
read -r EXPERIMENT PARENT VIEW < <(PYTHONPATH=$ROOT .venv/bin/python - "$STORE" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name("report-task2_2")
if experiment is None:
    sys.exit("no MLflow experiment report-task2_2: run python -m src.train experiment=task2_2")
runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
parents = [
    r for r in runs
    if "mlflow.parentRunId" not in r.data.tags and "seed=" not in r.data.tags.get("overrides", "")
]
if not parents:
    sys.exit("no task2_2 sweep in the store: run python -m src.train experiment=task2_2")
parent = parents[0]
# the view of its jobs, as the sweep shares it (written again for a sweep older than that)
from src import sweep
ref = sweep.ParentRef(parent.info.run_id, experiment.experiment_id)
sweep.share_sweep_view(client, ref, list(parent.data.params), sweep.BEST_METRIC, True)
print(experiment.experiment_id, parent.info.run_id, sweep.sweep_view_key(ref))
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

RUNS="$URL/#/experiments/$EXPERIMENT/runs"
ML=workflowType=machine_learning
NAMES=(mlflow_ui_sweep mlflow_ui_sweep_charts mlflow_ui_sweep_parent)
.venv/bin/python docs/screenshot.py "$URL" \
    "$PROFILE/${NAMES[0]}.png" "$RUNS?$ML&viewStateShareKey=$VIEW" \
    "$PROFILE/${NAMES[1]}.png" "$RUNS?$ML&viewStateShareKey=$VIEW&compareRunsMode=CHART" \
    "$PROFILE/${NAMES[2]}.png" "$RUNS/$PARENT?$ML"
mkdir -p docs/img
for name in "${NAMES[@]}"; do
    # A 256-colour palette keeps a screenshot of flat UI colours well under 150 KB; written
    # beside the target and renamed into place.
    out=docs/img/$name.png
    .venv/bin/python -c "import sys; from PIL import Image; \
Image.open(sys.argv[1]).convert('RGB').quantize(256, method=Image.Quantize.FASTOCTREE).save(sys.argv[2], 'PNG', optimize=True)" \
        "$PROFILE/$name.png" "$out.tmp"
    mv -f "$out.tmp" "$out"
    echo "$out: $(stat -c %s "$out") bytes"
done
