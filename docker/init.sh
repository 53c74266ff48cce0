#!/bin/sh
# One-shot `init` service of compose.yaml (app runner image, run as root, no network).
# Creates what is missing, then hands each service only its own material:
#   /init/pki            CA key and all keys        (only this container ever mounts it)
#   /init/synth          synthetic data set          (only this container)
#   /init/certs-superlink   ca.crt superlink.crt superlink.key
#   /init/certs-public      ca.crt nodes/hospital-K.pub   (ServerApp runner, enroll, submit)
#   /init/certs-hospital-K  ca.crt node.key node.key.pub  (that hospital's SuperNode only)
#   /init/data-hospital-K   train.jsonl validation.jsonl labels.json (that hospital only)
#   /init/data-server       test.jsonl labels.json manifest.json     (ServerApp runner)
# Files end up owned by the images' user app (49999); private keys 0600.
set -eu
N="${HOSPITALS:-3}"
UID_GID="${APP_UID:-49999}:${APP_GID:-49999}"

# INIT_SANS: extra names/IPs the SuperLink is reached by (space-separated), besides the
# built-in localhost, 127.0.0.1 and superlink.
set -- --san superlink --san localhost
for name in ${INIT_SANS:-}; do set -- "$@" --san "$name"; done
federimed certs --out /init/pki --hospitals "$N" "$@"
if [ ! -s /init/synth/manifest.json ]; then
    # shellcheck disable=SC2086
    federimed data synth --hospitals "$N" --out /init/synth ${SYNTH_ARGS:-}
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
k=1
while [ "$k" -le "$N" ]; do
    h="hospital-$k"
    put 0644 "/init/pki/nodes/$h.pub" "/init/certs-public/nodes/$h.pub"
    if [ -d "/init/certs-$h" ]; then
        put 0644 /init/pki/ca.crt "/init/certs-$h/ca.crt"
        put 0600 "/init/pki/nodes/$h" "/init/certs-$h/node.key"
        put 0644 "/init/pki/nodes/$h.pub" "/init/certs-$h/node.key.pub"
    fi
    if [ -d "/init/data-$h" ]; then
        for f in /init/synth/"$h"/*; do put 0644 "$f" "/init/data-$h/$(basename "$f")"; done
        if [ -f /init/synth/labels.json ]; then put 0644 /init/synth/labels.json "/init/data-$h/labels.json"; fi
    fi
    k=$((k + 1))
done
for f in test.jsonl labels.json manifest.json; do
    if [ -f "/init/synth/$f" ]; then put 0644 "/init/synth/$f" "/init/data-server/$f"; fi
done
for d in /init/*; do chown -R "$UID_GID" "$d"; done
chmod 0700 /init/pki
echo "init: certificates and data ready for $N hospitals"
