#!/bin/sh
# Create /opt/venv for one image role (run inside docker/Dockerfile, after `. pipenv.sh`).
#   make-venv.sh flower   plain venv (SuperLink, SuperNode)
#   make-venv.sh app      venv for the app runner: reuses the base image's torch when it has
#                         one (CUDA bases: venv with --system-site-packages), otherwise installs
#                         TORCH_SPEC (default torch==2.13.0, the CPU wheel of the wheelhouse).
# Python is whatever `python3` the base has: /usr/local/bin (python image), /usr/bin (Debian),
# /opt/conda/bin (pytorch image).
set -eu
role="$1"
py="$(command -v python3)"
echo "base python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
if [ "$role" = app ] && [ "${BASE_TORCH:-auto}" != no ] && "$py" -c 'import torch' 2>/dev/null; then
    "$py" -m venv --system-site-packages /opt/venv
    echo "reusing the base image's torch $("$py" -c 'import torch; print(torch.__version__)')"
else
    "$py" -m venv /opt/venv
    if [ "$role" = app ]; then
        /opt/venv/bin/pip install "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
if [ "$role" = app ]; then
    # Keep exactly this torch while the rest resolves (a range would pull a CUDA build).
    /opt/venv/bin/python -c 'import torch; print("torch==" + torch.__version__)' > /build/torch.txt
    cat /build/torch.txt
else
    : > /build/torch.txt
fi
