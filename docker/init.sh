#!/bin/sh
# One-shot `init` service of compose.yaml (app runner image, run as root, no network).
# Creates what is missing, then hands each service only its own material:
#   /init/pki            CA key and all keys        (only this container ever mounts it)
#   /init/synth          synthetic data set          (only this container)
#   /init/certs-superlink   ca.crt superlink.crt superlink.key
#   /init/certs-gateway     ca.crt gateway.crt gateway.key       (the fleet gateway only)
#   /init/certs-public      ca.crt nodes/hospital-K.pub   (ServerApp runner, enroll, submit)
#   /init/certs-hospital-K  ca.crt node.key node.key.pub  (that hospital's SuperNode only)
#   /init/data-hospital-K   train.jsonl validation.jsonl flashcards.jsonl
#                           flashcards-validation.jsonl labels.json  (that hospital only: its
#                           SuperNode and ClientApp runner, read-only)
#   /init/data-server       test.jsonl test-unseen-style.jsonl test-flashcards.jsonl
#                           labels.json manifest.json                (ServerApp runner)
#   /init/runtime-consortium  superexec.secret: the Runtime API secret of the SuperLink, shared
#                             with the ServerApp runner only
#   /init/runtime-hospital-K  superexec.secret: the secret of SuperNode K's Runtime API, shared
#                             with that hospital's ClientApp runner only (as the file's group)
#   /init/policy-hospital-K   policy.yaml: hospital K's site policy (mounted read-only in its
#                             SuperNode, whose guard applies it), approving the app bundle of
#                             this image (/app)
#   /init/ledger-hospital-K   (empty at first) hospital K's egress ledger, written by its
#                             SuperNode only
# Files end up owned by the images' user app (49999); private keys 0600, secrets 0400, except a
# hospital's Runtime API secret: 0440 with the group of the ClientApp runners' user (49998,
# `clientapp` in docker/Dockerfile), which runs apart from the SuperNode's user.
set -eu
N="${HOSPITALS:-3}"
UID_GID="${APP_UID:-49999}:${APP_GID:-49999}"
RUNNER_GID="${CLIENTAPP_GID:-49998}"

# INIT_SANS: extra names/IPs the SuperLink and the fleet gateway are reached by
# (space-separated), besides the built-in localhost, 127.0.0.1, superlink and fleet-gateway.
set -- --san superlink --san localhost
for name in ${INIT_SANS:-}; do set -- "$@" --san "$name"; done
federimed certs --out /init/pki --hospitals "$N" "$@"
if [ ! -s /init/synth/manifest.json ]; then
    # shellcheck disable=SC2086
    federimed data synth --track generative --hospitals "$N" --out /init/synth ${SYNTH_ARGS:-}
else
    echo "init: synthetic data already present, kept"
fi

put() {  # put MODE SRC DEST
    install -D -m "$1" "$2" "$3"
}
put 0644 /init/pki/ca.crt /init/certs-superlink/ca.crt
put 0644 /init/pki/superlink.crt /init/certs-superlink/superlink.crt
put 0600 /init/pki/superlink.key /init/certs-superlink/superlink.key
put 0644 /init/pki/ca.crt /init/certs-public/ca.crt
if [ -d /init/certs-gateway ]; then
    put 0644 /init/pki/ca.crt /init/certs-gateway/ca.crt
    put 0644 /init/pki/gateway.crt /init/certs-gateway/gateway.crt
    put 0600 /init/pki/gateway.key /init/certs-gateway/gateway.key
fi

secret() {  # secret DIR: a random Runtime API secret in DIR/superexec.secret, kept if present
    if [ -d "$1" ] && [ ! -s "$1/superexec.secret" ]; then
        (umask 077 && python3 -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' \
            > "$1/superexec.secret")
        echo "init: new Runtime API secret in $(basename "$1")"
    fi
    if [ -f "$1/superexec.secret" ]; then chmod 0400 "$1/superexec.secret"; fi
}
secret /init/runtime-consortium

# The demo approves, for every hospital, the app bundle this image submits (`flwr run /app`):
# in a real deployment each hospital reviews the app and runs `federimed approve` itself.
APP_HASH="$(federimed app hash /app)"
echo "init: app bundle $APP_HASH"
k=1
while [ "$k" -le "$N" ]; do
    h="hospital-$k"
    put 0644 "/init/pki/nodes/$h.pub" "/init/certs-public/nodes/$h.pub"
    if [ -d "/init/certs-$h" ]; then
        put 0644 /init/pki/ca.crt "/init/certs-$h/ca.crt"
        put 0600 "/init/pki/nodes/$h" "/init/certs-$h/node.key"
        put 0644 "/init/pki/nodes/$h.pub" "/init/certs-$h/node.key.pub"
    fi
    secret "/init/runtime-$h"
    if [ -d "/init/policy-$h" ]; then
        federimed approve --policy "/init/policy-$h/policy.yaml" --site "$h" \
            --ledger /ledger/egress-ledger.jsonl \
            --note "compose demo: the image's /app, approved by init on the hospital's behalf" \
            "$APP_HASH"
        chmod 0644 "/init/policy-$h/policy.yaml"
    fi
    if [ -d "/init/data-$h" ]; then
        for f in /init/synth/"$h"/*; do put 0644 "$f" "/init/data-$h/$(basename "$f")"; done
        if [ -f /init/synth/labels.json ]; then put 0644 /init/synth/labels.json "/init/data-$h/labels.json"; fi
    fi
    k=$((k + 1))
done
for f in test.jsonl test-unseen-style.jsonl test-flashcards.jsonl labels.json manifest.json; do
    if [ -f "/init/synth/$f" ]; then put 0644 "/init/synth/$f" "/init/data-server/$f"; fi
done
for d in /init/*; do chown -R "$UID_GID" "$d"; done
k=1
while [ "$k" -le "$N" ]; do
    s="/init/runtime-hospital-$k/superexec.secret"
    if [ -f "$s" ]; then chgrp "$RUNNER_GID" "$s" && chmod 0440 "$s"; fi
    k=$((k + 1))
done
chmod 0700 /init/pki
echo "init: certificates, secrets, site policies and data ready for $N hospitals"
