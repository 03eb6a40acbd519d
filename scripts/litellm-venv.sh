#!/usr/bin/env bash
# Create (once) the LiteLLM proxy's own virtual environment for `ragplane bench gateway`,
# from requirements/litellm.txt, under a cache directory outside the repository.
# Prints the path of its `litellm` executable on the last line.
#
#   scripts/litellm-venv.sh            # ~/.cache/ragplane/litellm-venv (or $RAGPLANE_LITELLM_VENV)
#   scripts/litellm-venv.sh DIR        # another directory
#
# A venv already built from the same requirements file is reused (a stamp holds the
# file's hash); a changed file rebuilds it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
req="$here/requirements/litellm.txt"
venv="${1:-${RAGPLANE_LITELLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ragplane/litellm-venv}}"
python="${PYTHON:-python3}"
want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.ragplane-requirements.sha256"

if [ -x "$venv/bin/litellm" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/litellm"
  exit 0
fi

# refuse the compromised releases whatever the file says
if grep -Eq '^litellm(\[[^]]*\])?==1\.82\.[78]\b' "$req"; then
  echo "error: $req pins a compromised litellm release (1.82.7/1.82.8)" >&2
  exit 2
fi

rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"
case "$version" in
  1.82.7|1.82.8) echo "error: installed compromised litellm $version" >&2; rm -rf "$venv"; exit 2 ;;
esac
echo "$want" > "$stamp"
echo "litellm $version installed in $venv" >&2
echo "$venv/bin/litellm"
