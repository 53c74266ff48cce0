#!/bin/bash
cd /tmp/wt && nice -n 19 /work/main/.venv/bin/mypy --config-file /tmp/mypy.ini federimed client_app server_app "$@"
