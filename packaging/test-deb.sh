#!/usr/bin/env bash
# Tests the Debian package for real on this machine (as root): builds it,
# installs it with dpkg, verifies the installed unit and the shipped config,
# checks the unit's hardening, then removes and purges it and checks that
# nothing is left behind.
#
#     packaging/test-deb.sh          (CI runs it after the tests, with DEB_PROFILE=dev)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }

[[ $(id -u) == 0 ]] || fail "run as root (it installs the package with dpkg)"
if dpkg -s tandem >/dev/null 2>&1; then
    fail "a tandem package is already installed here; remove it first (dpkg -P tandem)"
fi

# `tandem run` as root without a package (README's `scripts/run`) keeps its
# state, an embedded PostgreSQL among it, in /var/lib/tandem: the package's
# purge would delete it, and files in it owned by root are not the service
# user's. Set it aside (under /tmp, outside the leftovers search) and put it
# back when done, however the test ends.
aside=""
if [[ -e /var/lib/tandem ]]; then
    aside=$(mktemp -d)
    mv /var/lib/tandem "$aside/tandem"
    echo "== /var/lib/tandem set aside in $aside until the test ends"
fi
restore() {
    if [[ -n $aside ]]; then
        rm -rf /var/lib/tandem
        mv "$aside/tandem" /var/lib/tandem && rmdir "$aside"
    fi
}
trap restore EXIT

# Files named like tandem outside this checkout, before the package is
# installed; whatever purge leaves beyond these is a leftover. (The checkout
# may live anywhere, /check/... on CI, and is full of such names.)
checkout=$(pwd -P)
named_tandem() {
    find / -xdev \( -path /proc -o -path /sys -o -path /tmp -o -path "$checkout" \) -prune -o \
        \( -name tandem -o -name 'tandem.*' -o -name 'tandem_*' -o -name 'tandem-*' \) -print 2>/dev/null \
        | grep -v -e '^/var/lib/dpkg/' -e '^/var/cache/' | sort || true
}
named_before=$(named_tandem)

# DEB_PROFILE=dev packages the debug binary (scripts/test does, to spare a
# release build); the default is the release build.
packaging/build-deb.sh ${DEB_PROFILE:+--profile "$DEB_PROFILE"}
deb=$(ls -1t target/debian/tandem_*.deb | head -1)
echo "== package: $deb"
dpkg-deb --info "$deb" | sed -n '1,40p'
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/tandem ./etc/tandem/tandem.toml ./lib/systemd/system/tandem.service \
         ./usr/share/doc/tandem/README.md ./usr/share/doc/tandem/monitoring/alerts.yml; do
    grep -q " $f\$" <<<"$contents" || grep -q " ${f/lib\/systemd/usr\/lib\/systemd}\$" <<<"$contents" \
        || fail "the package lacks $f"
done
dpkg-deb --field "$deb" Depends | grep -q adduser || fail "Depends lacks adduser"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/tandem/tandem.toml \
    || fail "/etc/tandem/tandem.toml is not a conffile"
pass "package contents, conffile, dependencies"

cleanup() {
    dpkg -P tandem >/dev/null 2>&1 || true
    restore
}
trap cleanup EXIT

dpkg -i "$deb"
getent passwd tandem >/dev/null || fail "no tandem system user after install"
[[ $(stat -c '%U:%G %a' /etc/tandem/tandem.toml) == "root:tandem 640" ]] \
    || fail "/etc/tandem/tandem.toml is $(stat -c '%U:%G %a' /etc/tandem/tandem.toml)"
unit=$(systemctl show -P FragmentPath tandem.service 2>/dev/null || true)
[[ -n $unit && -f $unit ]] || unit=$(ls /lib/systemd/system/tandem.service /usr/lib/systemd/system/tandem.service 2>/dev/null | head -1)
[[ -f $unit ]] || fail "the unit was not installed"
ls -l /etc/systemd/system/multi-user.target.wants/tandem.service >/dev/null 2>&1 \
    || fail "the unit was not enabled (multi-user.target.wants)"
pass "installed: /usr/bin/tandem, $unit (enabled), user tandem, config root:tandem 0640"

systemd-analyze verify "$unit"
pass "systemd-analyze verify $unit"
exposure=$(systemd-analyze security --offline=yes "$unit" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
[[ -n $exposure ]] || fail "no exposure level from systemd-analyze security"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure > 2.0"
pass "systemd-analyze security --offline=yes: exposure $exposure (<= 2.0)"
grep -q '^ExecReload=' "$unit" || fail "the unit has no ExecReload"

# The installed binary on the shipped config, as the service user.
out=$(STATE_DIRECTORY=/var/lib/tandem runuser -u tandem -- /usr/bin/tandem check-config --config /etc/tandem/tandem.toml 2>&1) \
    || { echo "$out"; fail "check-config refused the shipped config"; }
echo "$out" | head -5
grep -q "data_dir *$(printf '%s' /var/lib/tandem)\$" <<<"$out" || fail "data_dir is not /var/lib/tandem under the unit's StateDirectory"
/usr/bin/tandem --version
pass "the installed binary accepts the shipped config"

# State as the service would leave it, then remove and purge.
install -d -o tandem -g tandem /var/lib/tandem
runuser -u tandem -- touch /var/lib/tandem/position.json
dpkg -r tandem
[[ ! -e /usr/bin/tandem ]] || fail "/usr/bin/tandem is left after dpkg -r"
[[ ! -e $unit ]] || fail "$unit is left after dpkg -r"
[[ -f /etc/tandem/tandem.toml ]] || fail "dpkg -r removed the conffile (it keeps it until purge)"
[[ -d /var/lib/tandem ]] || fail "dpkg -r removed the state (it keeps it until purge)"
pass "dpkg -r: binary and unit gone; config and state kept"
dpkg -P tandem
for p in /etc/tandem /var/lib/tandem /etc/systemd/system/multi-user.target.wants/tandem.service \
         /usr/share/doc/tandem; do
    [[ ! -e $p ]] || fail "$p is left after dpkg -P"
done
! getent passwd tandem >/dev/null || fail "the tandem user is left after dpkg -P"
! dpkg -s tandem >/dev/null 2>&1 || fail "dpkg still knows tandem after purge"
leftovers=$(comm -13 <(echo "$named_before") <(named_tandem))
[[ -z $leftovers ]] || { echo "$leftovers"; fail "files named tandem are left after dpkg -P"; }
pass "dpkg -P: nothing left (config, state, user, unit links)"
trap - EXIT
restore
echo "== package test passed"
