#!/usr/bin/env bash
# docs/scaling.md's metadata model against CommDebugMode at 2..64 ranks (oversubscribed on a small
# machine): one scripts/check_scaling.py run per P, then a markdown table. Exit 1 if any P differs.
#   scripts/check_scaling.sh [OUT.md|-] [P ...]      (default: - = standard output; P: 2 4 8 16 32 64)
set -u
cd "$(dirname "$0")/.."
out=${1:--}; shift || true
# (never "> /dev/stdout": where standard output is a file, that reopens and truncates it)
[ "$out" = "-" ] || exec 3>"$out"
[ "$out" != "-" ] || exec 3>&1
ps=${*:-2 4 8 16 32 64}
py=${PYTHON:-.venv/bin/python}; mpiexec=${MPIEXEC:-.venv/bin/mpiexec}  # e.g. MPIEXEC="/usr/bin/mpirun --oversubscribe"
tmp=$(mktemp -d); status=0
for p in $ps; do
  if ! timeout 900 $mpiexec -n "$p" env OMP_NUM_THREADS=1 "$py" scripts/check_scaling.py --json "$tmp/$p.json" > "$tmp/$p.log" 2>&1; then
    status=1; echo "P=$p failed: $(tail -3 "$tmp/$p.log")" >&2
  fi
done
"$py" - "$tmp" $ps >&3 <<'PY'
import json, sys, os
tmp, ps = sys.argv[1], sys.argv[2:]
keys = ["shape_agreement_count", "shape_agreement_bytes", "received_bytes", "signature_count", "signature_bytes",
        "other_metadata_bytes", "data_collectives"]
print("| P | " + " | ".join(keys) + " | matches the model |")
print("|---:|" + "---:|" * len(keys) + "---|")
for p in ps:
    f = os.path.join(tmp, p + ".json")
    if not os.path.exists(f):
        print(f"| {p} | " + " | ".join("-" for _ in keys) + " | run failed |"); continue
    r = json.load(open(f))
    cell = lambda k: (str(r["min"][k]) if r["min"][k] == r["max"][k] else f"{r['min'][k]}..{r['max'][k]}") + f" ({r['model'][k]})"
    print(f"| {p} | " + " | ".join(cell(k) for k in keys) + f" | {'yes' if r['ok'] else 'NO'} |")
print("\nEach cell: the value on every rank (min..max over ranks where they differ) and, in brackets, the model's.")
PY
rm -rf "$tmp"
exit $status
