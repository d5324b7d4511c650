# Sourced by scripts that build or run the trainer: a Python venv with the pinned torch wheel
# (tch 0.26 links libtorch 2.13 from it) and the reference packages the tests compare against.
#   . scripts/torch-env.sh
# Re-sourcing reuses the venv; pip only installs what is missing.
VENV=${REDDINO_VENV:-$PWD/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating Python venv in $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, timm, safetensors, numpy, sklearn' 2>/dev/null \
    || [ tests/reference/requirements.txt -nt "$VENV/.reddino-requirements" ]; then
    echo "==> installing torch and the reference packages (tests/reference/requirements.txt)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        -r tests/reference/requirements.txt
    touch "$VENV/.reddino-requirements"
fi
# tch's build script finds libtorch through `python`: the venv's comes first.
export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export REDDINO_PYTHON="$VENV/bin/python"
