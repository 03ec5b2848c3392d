#!/usr/bin/env bash
# Study 5 on one CUDA machine from the .gpu/ folder that `python -m experiments.device_pack` made (see its docstring).
# All six runs (3 seeds x 2 arms) train at once for --budget-min each, then each is evaluated on Kodak24 at 256 px
# for k = 16, 32, 64, 128 kept channels. Writes OUT/structured_latent_study.json, OUT/study.log, the runs' logs
# (OUT/run_logs.tgz) and the seed-0 weights of both arms split into 15 MiB parts (OUT/<arm>.safetensors.part-*;
# join them with cat; their sha256 is in the JSON).
set -euo pipefail
OUT=${1:?usage: device_run.sh OUT_DIR [BUDGET_MIN]}
BUDGET=${2:-4}
export PYTHONPATH=$PWD/.gpu/site:$PWD DCAE_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python -m experiments.structured_latent_study --budget-min "$BUDGET" --seeds 0 1 2 --resolution 128 --parallel \
    --eval-sets kodak24 --no-rfid --out "$OUT/structured_latent_study.json" >"$OUT/study.log" 2>&1 \
    || { tail -60 "$OUT/study.log"; exit 1; }
tail -8 "$OUT/study.log"
tar czf "$OUT/run_logs.tgz" runs/experiments/*/log.jsonl runs/experiments/*/stdout.log runs/experiments/*/budget.json
python - "$OUT" <<'PY'
import json, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
results = json.loads((out / "structured_latent_study.json").read_text())
for arm in results["arms"]:
    if arm["seed"] == 0:
        weights = Path(arm["run_dir"]) / "model.safetensors"
        subprocess.run(["split", "-b", "15M", str(weights), str(out / f"{arm['name']}.safetensors.part-")], check=True)
        print(arm["name"], weights, arm["weights_sha256"])
PY
