# Sourced by demo.sh and test.sh: a virtualenv in .venv with nf and its test dependencies.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Byte-compile as a regular (non-editable) install does: where PYTHONDONTWRITEBYTECODE is set,
# every agent start would otherwise compile nf's sources again (0.1 s of a passive's start-up).
.venv/bin/python -m compileall -q engine nftui integrations >/dev/null
