#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in a cache folder keyed by the pinned dependency set,
# and print its path. The venv is reused until a pin in pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FTJ_CACHE:-$HOME/.cache/finetune-operator}"
PY="${PYTHON:-python3}"
key="$("$PY" - "$root/pyproject.toml" <<'PYEOF'
import hashlib, json, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = {"base": p["dependencies"], **p["optional-dependencies"], "py": sys.version_info[:2]}
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
PYEOF
)"
venv="$CACHE/venv-$key"
mkdir -p "$CACHE"
# One builder at a time: a second caller waits for the first instead of deleting its half-built venv.
exec 9>"$CACHE/.venv-$key.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
  echo "creating $venv (first time: downloads torch and friends, several GB)..." >&2
  rm -rf "$venv"; mkdir -p "$CACHE"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip==25.3" >&2
  "$venv/bin/pip" install -q -e "$root[operator,trainer,cli,dev]" >&2
  touch "$venv/.complete"
else
  # the package itself is installed editable; re-link it if this is another checkout
  if ! "$venv/bin/python" -c "import finetune_operator, sys; sys.exit(0 if finetune_operator.__file__.startswith('$root/') else 1)" 2>/dev/null; then
    "$venv/bin/pip" install -q --no-deps -e "$root" >&2
  fi
fi
echo "$venv"
