# shellcheck shell=bash
# Helpers shared by scripts/*.sh (sourced, not run): the platform differences the scripts
# depend on, in one place. bash 3.2 compatible (macOS's /bin/bash).

# is_debian: true on Debian/Ubuntu and derivatives, where system packages come from apt-get.
is_debian() {
    [[ -f /etc/debian_version ]] && command -v apt-get >/dev/null 2>&1 &&
        command -v dpkg-query >/dev/null 2>&1
}

# apt_install WHO PKG...: installs those Debian packages PKG that are not installed yet (through
# sudo unless root). Only where is_debian holds: elsewhere it fails at once, installing nothing,
# and the caller says what to install instead. WHO prefixes the messages.
apt_install() {
    local who="$1" pkg missing=""
    shift
    is_debian || { echo "$who: apt_install called off Debian/Ubuntu" >&2; return 1; }
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing="$missing $pkg"
    done
    [[ -n "$missing" ]] || return 0
    echo "$who: installing$missing"
    local sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
}

# sha256 FILE: prints FILE's SHA-256 in hex: GNU coreutils' sha256sum (Linux) or
# `shasum -a 256` (Perl's, shipped with macOS).
sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        echo "sha256: neither sha256sum (coreutils) nor shasum (perl) is installed" >&2
        return 2
    fi
}

# sha256_check [-q]: reads lines `HASH  FILE` (sha256sum's format, FILE relative to the current
# directory) from standard input and succeeds when every FILE exists with that HASH; otherwise
# names each bad file on standard error (nothing with -q) and fails.
sha256_check() {
    local quiet="" status=0 want file got
    [[ "${1:-}" == -q ]] && quiet=1
    while read -r want file; do
        [[ -n "$want" ]] || continue
        if [[ -f "$file" ]]; then
            got="$(sha256 "$file")" || return 2
        else
            got="(missing)"
        fi
        if [[ "$got" != "$want" ]]; then
            status=1
            [[ -n "$quiet" ]] || echo "sha256 mismatch: $file: expected $want, got $got" >&2
        fi
    done
    return "$status"
}

# wait_listening PID OUT LOG: wait (up to 10 s) for a `modelpool serve` started as PID, writing
# stdout to OUT and stderr to LOG, to print its "listening on" line; on failure print LOG and
# exit 1.
wait_listening() {
    local pid="$1" out="$2" log="$3"
    for _ in $(seq 1 100); do
        grep -q "listening on" "$out" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "server exited:"; cat "$log"; exit 1; }
        sleep 0.1
    done
    grep -q "listening on" "$out" || { echo "server did not start:"; cat "$log"; exit 1; }
}
