#!/usr/bin/env bash
# `make test-containers`: build the images and run the compose deployment for real.
# Needs root (it may apt-get install docker.io/debootstrap and start dockerd); see
# tests/test_containers.py for what is checked and the settings it reads.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m pytest -m containers tests/test_containers.py -v -rA -p no:cacheprovider "$@"
