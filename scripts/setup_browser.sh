#!/usr/bin/env bash
# Make sure the browser tests have a browser: Debian's chromium (apt; Playwright's own browser download
# needs the internet). Playwright itself comes with the venv. Sourced by test.sh; exports DM_CHROMIUM.
set -euo pipefail

if [[ -z "${DM_CHROMIUM:-}" ]]; then
    DM_CHROMIUM="$(command -v chromium || command -v chromium-browser || true)"
fi
if [[ -z "$DM_CHROMIUM" ]]; then
    echo "installing chromium (apt) for the browser tests"
    sudo_cmd=()
    [[ "$(id -u)" != 0 ]] && sudo_cmd=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends chromium > /dev/null
    DM_CHROMIUM="$(command -v chromium)"
fi
export DM_CHROMIUM

