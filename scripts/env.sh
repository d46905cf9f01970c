# Sourced by run_train.sh and tests/run.sh: choose the Python that runs ppdreambooth, install the
# project into it when needed, and export it as $PY.
#   PPDB_PYTHON=/path/to/python   use that interpreter (e.g. a conda env with paddlepaddle-gpu)
#   otherwise ./.venv if it exists; otherwise the current python3 if it already has paddle
#   (a GPU user's environment: their paddlepaddle-gpu is kept); otherwise a new ./.venv with the
#   CPU build of PaddlePaddle (the `cpu` extra). Pins live in constraints.txt, read by setup.py.
PPDB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PPDB_PYTHON:-}" ]; then
  PY=$PPDB_PYTHON
elif [ -x "$PPDB_ROOT/.venv/bin/python" ]; then
  PY=$PPDB_ROOT/.venv/bin/python
elif python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('paddle') is None)" 2>/dev/null; then
  PY=$(command -v python3)
else
  echo "ppdreambooth: creating $PPDB_ROOT/.venv (CPU PaddlePaddle) ..." >&2
  python3 -m venv "$PPDB_ROOT/.venv"
  PY=$PPDB_ROOT/.venv/bin/python
fi
export PY

ppdb_install() {  # ppdb_install [extra,...]: (re)install when setup.py or the pins changed
  local extras=${1:-}
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('paddle') is None)" 2>/dev/null; then
    extras=${extras:+$extras,}cpu
  fi
  local stamp_dir
  stamp_dir=$("$PY" -c "import sys; print(sys.prefix)")
  local stamp="$stamp_dir/.ppdreambooth-installed"
  local want
  want="$(cat "$PPDB_ROOT/setup.py" "$PPDB_ROOT/constraints.txt" | cksum) $extras"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import ppdreambooth" 2>/dev/null; then
    echo "ppdreambooth: installing into $PY (extras: ${extras:-none}) ..." >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$PPDB_ROOT${extras:+[$extras]}" >&2
    echo "$want" > "$stamp" 2>/dev/null || true
  fi
}

ppdb_torch_client() {  # prints the Python of .venv-torch (PyTorch + diffusers), creating it when needed
  local venv="$PPDB_ROOT/.venv-torch" req="$PPDB_ROOT/tests/torch_client_requirements.txt"
  local want
  want=$(cksum < "$req")
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]; then
    echo "ppdreambooth: preparing $venv (PyTorch + diffusers client for the interop tests) ..." >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    echo "$want" > "$venv/.installed"
  fi
  echo "$venv/bin/python"
}
