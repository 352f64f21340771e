#!/usr/bin/env bash
# Revoke certificates of the fleet CA and write a fresh CRL.
#
#   revoke-cert.sh [--ca DIR] [--reason R] CERT_FILE...
#   revoke-cert.sh [--ca DIR] [--reason R] --serial HEX
#   revoke-cert.sh [--ca DIR] [--reason R] --name CN
#   revoke-cert.sh [--ca DIR] --crl-only
#
# --name revokes every still-valid certificate issued to CN (a stolen or
# retired vehicle); a certificate file or serial revokes just that one (the
# old certificate after a rotation). --crl-only re-signs the CRL with nothing
# new revoked: do that on a schedule, the CRL expires after 90 days and the
# broker then refuses every client. R is one of unspecified, keyCompromise,
# superseded, cessationOfOperation, affiliationChanged (default unspecified).
# Then copy DIR/crl.pem to the broker's /etc/mosquitto/fleet/ and restart
# mosquitto: a reload (SIGHUP) re-reads the CRL for new connections, but only
# a restart cuts a revoked client that is connected right now.

# shellcheck source-path=SCRIPTDIR source=ca-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/ca-common.sh"

reason=unspecified
files=()
serial=""
cn=""
crl_only=no
while [[ $# -gt 0 ]]; do
    case $1 in
        --ca) need_value "$1" $#; FLEET_CA_DIR=$2; shift 2 ;;
        --reason) need_value "$1" $#; reason=$2; shift 2 ;;
        --serial) need_value "$1" $#; serial=$2; shift 2 ;;
        --name) need_value "$1" $#; cn=$2; shift 2 ;;
        --crl-only) crl_only=yes; shift ;;
        -h|--help) usage ;;
        -*) printf 'unknown option: %s\n\n' "$1" >&2; usage 2 ;;
        *) files+=("$1"); shift ;;
    esac
done
case $reason in
    unspecified|keyCompromise|superseded|cessationOfOperation|affiliationChanged) ;;
    *) die "--reason: unknown reason '$reason'" ;;
esac
require_ca

if [[ -n $serial ]]; then
    [[ $serial =~ ^[0-9A-Fa-f]+$ ]] || die "--serial: expected hex digits, got '$serial'"
    serial=${serial^^}
    [[ -f $FLEET_CA_DIR/certs/$serial.pem ]] || die "no certificate with serial $serial"
    files+=("$FLEET_CA_DIR/certs/$serial.pem")
fi
if [[ -n $cn ]]; then
    found=0
    # index.txt: status, expiry, revocation date, serial, file, subject (tab-separated;
    # awk, not read: read would merge the empty revocation date of a valid entry).
    while read -r ser; do
        files+=("$FLEET_CA_DIR/certs/$ser.pem")
        found=$((found + 1))
    done < <(awk -F'\t' -v subject="/CN=$cn" '$1 == "V" && $6 == subject { print $4 }' \
                 "$FLEET_CA_DIR/index.txt")
    [[ $found -gt 0 ]] || die "no valid certificate named '$cn'"
fi
if [[ $crl_only == no && ${#files[@]} -eq 0 ]]; then
    usage 2
fi

for file in "${files[@]}"; do
    [[ -f $file ]] || die "no such certificate file '$file'"
    subject=$(openssl x509 -in "$file" -noout -subject -nameopt compat)
    if ! log=$(ca -revoke "$file" -crl_reason "$reason" 2>&1); then
        die "could not revoke $file: $log"
    fi
    echo "revoked ${subject#subject=} ($(openssl x509 -in "$file" -noout -serial))"
done
gen_crl
echo "wrote $FLEET_CA_DIR/crl.pem; copy it to the broker and restart mosquitto"
