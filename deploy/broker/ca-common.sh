# shellcheck shell=bash
# Helpers shared by the fleet CA scripts in this directory; sourced, never run.
#
# The CA is a plain `openssl ca` directory: index.txt records every
# certificate issued, so a certificate can be revoked and a CRL generated
# later. Keep it on an offline or tightly held machine, not on the broker.

set -euo pipefail
# Character classes such as [A-Za-z] must mean ASCII, whatever the user's locale.
export LC_ALL=C
umask 077

FLEET_CA_DIR="${FLEET_CA_DIR:-./fleet-ca}"
# Certificates without an explicit lifetime; a vehicle that is not rotated by then
# drops off the broker, so pick what your maintenance cycle can keep up with.
# shellcheck disable=SC2034  # used by the scripts that source this file
DEFAULT_DAYS=825
# The CRL's nextUpdate. Once it passes, OpenSSL rejects *every* client of a
# listener with crlfile set, so refresh the CRL well before (revoke-cert.sh --crl-only).
CRL_DAYS=90

# The script's header comment is its help text.
usage() {
    [[ ${1:-0} -eq 0 ]] || exec >&2
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}

die() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

need_value() {
    # $1 option name, $2 the number of arguments left including the option.
    [[ $2 -ge 2 ]] || die "$1 needs a value"
}

valid_days() {
    [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] || die "--days: expected a whole number of days, got '$1'"
}

# The gateway's vehicle id rule (gateway/mqtt/topics.py). Anything else could not
# be a topic level, and '+', '#' or '/' in a certificate name would turn the
# ACL's %u patterns into wildcards.
valid_vehicle_id() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]
}

# Operator names are NAME@ROLE: the '@' can never occur in a vehicle id, so an
# operator certificate can never be mistaken for a vehicle, or the reverse.
valid_operator_name() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$ ]]
}

require_ca() {
    [[ -f $FLEET_CA_DIR/ca.crt && -f $FLEET_CA_DIR/ca.key && -f $FLEET_CA_DIR/openssl.cnf ]] \
        || die "no fleet CA in '$FLEET_CA_DIR' (run make-ca.sh, or pass --ca DIR)"
}

# openssl.cnf names its files relative to $FLEET_CA_HOME, so the CA directory can be
# moved or restored from a backup anywhere.
ossl() {
    local home
    home=$(cd "$FLEET_CA_DIR" && pwd -P)
    FLEET_CA_HOME=$home openssl "$@"
}

ca() {
    ossl ca -batch -config "$FLEET_CA_DIR/openssl.cnf" "$@"
}

gen_crl() {
    ca -gencrl -crldays "$CRL_DAYS" -out "$FLEET_CA_DIR/crl.pem.new" 2>/dev/null \
        || die "could not generate the CRL"
    chmod 0644 "$FLEET_CA_DIR/crl.pem.new"
    mv -f "$FLEET_CA_DIR/crl.pem.new" "$FLEET_CA_DIR/crl.pem"
}

# new_key FILE: a P-256 key; small and fast on a Pi-class head unit.
new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null \
        || die "could not create the key $1"
    chmod 0600 "$1"
}

# sign CSR CERT CN DAYS EXTENSION-SECTION [EXTFILE]: the CA signs CSR as CN.
# -subj replaces whatever name the CSR asked for: the CA, not the requester,
# decides the name the broker will use as the MQTT username.
sign() {
    local csr=$1 cert=$2 cn=$3 days=$4 section=$5 extfile=${6:-}
    local args=(-in "$csr" -out "$cert.new" -subj "/CN=$cn" -days "$days" -notext
                -extensions "$section")
    [[ -n $extfile ]] && args+=(-extfile "$extfile")
    local log
    if ! log=$(ca "${args[@]}" 2>&1); then
        rm -f "$cert.new"
        die "the CA refused to sign $csr: $log"
    fi
    chmod 0644 "$cert.new"
    mv -f "$cert.new" "$cert"
}

# issue_client CN OUT DAYS SECTION CSR FORCE: key (unless a CSR was given), CSR and
# certificate in OUT, with a copy of the CA certificate beside them.
issue_client() {
    local cn=$1 out=$2 days=$3 section=$4 csr_in=$5 force=$6
    if [[ -e $out/client.crt && $force != yes ]]; then
        die "$out/client.crt exists; pass --force to replace it, or another --out"
    fi
    mkdir -p "$out"
    # A failed run leaves no half-made files behind.
    # shellcheck disable=SC2064  # expand now: $out is local
    trap "rm -f $(printf %q "$out")/client.*.new" EXIT
    if [[ -n $csr_in ]]; then
        # The key stays where the CSR was made, ideally on the vehicle itself.
        cp "$csr_in" "$out/client.csr.new"
        rm -f "$out/client.key"
    else
        new_key "$out/client.key.new"
        openssl req -new -key "$out/client.key.new" -subj "/CN=$cn" \
            -out "$out/client.csr.new" 2>/dev/null || die "could not create the CSR"
    fi
    sign "$out/client.csr.new" "$out/client.crt" "$cn" "$days" "$section"
    mv -f "$out/client.csr.new" "$out/client.csr"
    [[ -e $out/client.key.new ]] && mv -f "$out/client.key.new" "$out/client.key"
    cp "$FLEET_CA_DIR/ca.crt" "$out/ca.crt"
    chmod 0644 "$out/ca.crt" "$out/client.csr"
}
