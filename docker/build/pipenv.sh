# Sourced by the RUN steps of docker/Dockerfile (POSIX sh). Turns the build arguments into
# pip's environment for this one RUN step only, so nothing of it stays in an image:
#   INDEX_URL, EXTRA_INDEX_URL, TRUSTED_HOST  -> PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#   NO_INDEX=1                                -> wheels only from the wheelhouse (air-gapped)
#   docker/build-ca/*.crt|*.pem               -> appended to the base's CA bundle (TLS-inspecting
#                                                proxies, hospital CAs); pip uses the result
set -eu
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
       PIP_PROGRESS_BAR=off PIP_DEFAULT_TIMEOUT="${PIP_TIMEOUT:-180}" PIP_FIND_LINKS=/wheelhouse
[ -n "${INDEX_URL:-}" ] && export PIP_INDEX_URL="$INDEX_URL"
[ -n "${EXTRA_INDEX_URL:-}" ] && export PIP_EXTRA_INDEX_URL="$EXTRA_INDEX_URL"
[ -n "${TRUSTED_HOST:-}" ] && export PIP_TRUSTED_HOST="$TRUSTED_HOST"
case "${NO_INDEX:-}" in 1|true|yes) export PIP_NO_INDEX=1 ;; esac

_extra_ca=$(find /build/ca -maxdepth 1 -type f \( -name '*.crt' -o -name '*.pem' \) 2>/dev/null | sort)
if [ -n "$_extra_ca" ]; then
    _bundle=/tmp/build-ca-bundle.pem
    : > "$_bundle"
    for _sys in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        if [ -s "$_sys" ]; then cat "$_sys" >> "$_bundle"; break; fi
    done
    # shellcheck disable=SC2086
    cat $_extra_ca >> "$_bundle"
    export PIP_CERT="$_bundle" SSL_CERT_FILE="$_bundle" REQUESTS_CA_BUNDLE="$_bundle"
fi
unset _extra_ca _bundle _sys
