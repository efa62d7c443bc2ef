#!/usr/bin/env bash
# Checks resources/ (part of tests/run.sh): builds the container image without a container
# engine (resources/image/build.sh, umoci), then tests/resources/check.py validates the
# manifests against the Kubernetes API schemas (kubernetes-validate, from PyPI, in a venv
# under target/), checks every pod against Pod Security Standards "restricted", the shipped
# seccomp profile against `podvm seccomp-profile`, and the image's configuration.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/../.."

if ! command -v umoci >/dev/null; then
    if ((EUID == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends umoci >/dev/null
    else
        echo "resources: umoci is missing; install it with: sudo apt-get install -y umoci" >&2
        exit 1
    fi
fi

venv=target/resources-venv
if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        'kubernetes-validate==1.37.0' 'PyYAML>=6,<7'
fi

resources/image/build.sh target/image
"$venv/bin/python" tests/resources/check.py --self-test
"$venv/bin/python" tests/resources/check.py target/debug/podvm target/image/oci
