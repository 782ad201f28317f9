#!/usr/bin/env bash
# Create or reuse .venv, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
export PATH="$ROOT/.venv/bin:$PATH"
echo "[test] running pytest"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
