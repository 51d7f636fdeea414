#!/usr/bin/env bash
# Installs what tandem's tests (and, with --bench, its benchmarks) need on a
# fresh Debian/Ubuntu machine. Safe to run again: it only installs what is
# missing. Needs root (or sudo) only when something is missing.
set -euo pipefail

want=()
have_pg_server() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_pg_server || want+=(postgresql)
command -v promtool >/dev/null 2>&1 || want+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
command -v python3 >/dev/null 2>&1 || want+=(python3)
# The uploads tests' S3-compatible server (moto) lives in a venv.
python3 -m venv --help >/dev/null 2>&1 || want+=(python3-venv)
command -v node >/dev/null 2>&1 || want+=(nodejs)
command -v chattr >/dev/null 2>&1 || want+=(e2fsprogs)
# The staging cluster (scripts/demo-cluster.sh check) and the package test.
command -v haproxy >/dev/null 2>&1 || want+=(haproxy)
command -v curl >/dev/null 2>&1 || want+=(curl)
command -v adduser >/dev/null 2>&1 || want+=(adduser)
if [[ "${1:-}" == "--bench" ]]; then
    command -v wrk >/dev/null 2>&1 || want+=(wrk)
    command -v nginx >/dev/null 2>&1 || want+=(nginx-light)
    # The search benchmark's corpus: PostgreSQL's HTML documentation.
    ls /usr/share/doc/postgresql-doc-*/html/index.html >/dev/null 2>&1 || want+=(postgresql-doc-15)
fi

install_moto() {
    # moto's S3 server, in a venv under target/ (reused by later runs):
    # the uploads tests start it on loopback (tests/common/s3.rs).
    local venv
    venv="$(cd "$(dirname "$0")/.." && pwd)/target/tools/moto"
    if [[ -x "$venv/bin/moto_server" ]]; then
        return
    fi
    echo "installing moto (S3-compatible test server) into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'moto[s3]==5.2.5' flask flask-cors
}

if ((${#want[@]} == 0)); then
    install_moto
    exit 0
fi

echo "installing: ${want[*]}" >&2
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends: the server binaries only; no cluster is created
# or started for the postgresql package's sake (the tests start their own).
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
# The Debian prometheus package starts a server; the tests only need promtool.
if [[ " ${want[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# The haproxy package starts one on :80 on some systems; the demo runs its own.
if [[ " ${want[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now haproxy >/dev/null 2>&1 || true
fi
# nginx-light starts a default site on :80 on some systems; the benchmark runs its own.
if [[ " ${want[*]} " == *" nginx-light "* ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
fi
install_moto
