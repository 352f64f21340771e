#!/usr/bin/env bash
# Issue a vehicle's client certificate, signed by the fleet CA, with CN = vehicle id.
#
#   issue-vehicle-cert.sh VEHICLE_ID [--days N] [--out DIR] [--ca DIR] [--csr FILE]
#                         [--host BROKER] [--port N] [--force]
#
# Writes DIR/client.key, client.csr, client.crt and a copy of ca.crt (DIR
# defaults to ./vehicles/VEHICLE_ID; --ca defaults to $FLEET_CA_DIR or
# ./fleet-ca). With --csr the CA signs a request made elsewhere, ideally on
# the vehicle so its key never travels; the certificate's name is VEHICLE_ID
# whatever the request asked for. Prints the settings for the vehicle's
# gateway.toml. The broker uses the CN as the MQTT username and its ACL lets
# that name use only evgw/v1/VEHICLE_ID/..., so VEHICLE_ID must be exactly the
# gateway's [gateway] vehicle_id. See docs/fleet-broker.md.

# shellcheck source-path=SCRIPTDIR source=ca-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/ca-common.sh"

vehicle=""
days=$DEFAULT_DAYS
out=""
csr=""
host="mqtt.example.com"
port=8883
force=no
while [[ $# -gt 0 ]]; do
    case $1 in
        --days) need_value "$1" $#; valid_days "$2"; days=$2; shift 2 ;;
        --out) need_value "$1" $#; out=$2; shift 2 ;;
        --ca) need_value "$1" $#; FLEET_CA_DIR=$2; shift 2 ;;
        --csr) need_value "$1" $#; csr=$2; shift 2 ;;
        --host) need_value "$1" $#; host=$2; shift 2 ;;
        --port)
            need_value "$1" $#
            [[ $2 =~ ^[1-9][0-9]{0,4}$ && $2 -le 65535 ]] || die "--port: bad port '$2'"
            port=$2; shift 2 ;;
        --force) force=yes; shift ;;
        -h|--help) usage ;;
        -*) printf 'unknown option: %s\n\n' "$1" >&2; usage 2 ;;
        *)
            [[ -z $vehicle ]] || die "one vehicle id at a time (got '$vehicle' and '$1')"
            vehicle=$1; shift ;;
    esac
done
[[ -n $vehicle ]] || usage 2
if ! valid_vehicle_id "$vehicle"; then
    die "bad vehicle id '$vehicle': use 1-64 letters, digits, '_', '-' or '.'," \
        "starting with a letter or digit (no '+', '#', '/' or spaces: the broker's" \
        "ACL puts the id into topic patterns)"
fi
[[ $host =~ ^[A-Za-z0-9:.-]+$ ]] || die "--host: bad host name '$host'"
[[ -z $csr || -f $csr ]] || die "--csr: no such file '$csr'"
require_ca
out=${out:-./vehicles/$vehicle}

issue_client "$vehicle" "$out" "$days" vehicle_cert "$csr" "$force"

serial=$(openssl x509 -in "$out/client.crt" -noout -serial)
expiry=$(openssl x509 -in "$out/client.crt" -noout -enddate)
cat <<MSG
issued $out/client.crt for vehicle '$vehicle' (${serial#serial=}, valid until ${expiry#notAfter=})

Copy ca.crt, client.crt${csr:+ (the key stays where the CSR was made)}${csr:- and client.key} to the vehicle's
/etc/ev-gateway/tls/ (client.key: owner root, group of the gateway's user, mode 0640)
and put this in /etc/ev-gateway/gateway.toml (paths are relative to that file),
whose [gateway] vehicle_id must be "$vehicle":

[mqtt]
host = "$host"
port = $port

[mqtt.tls]
ca = "tls/ca.crt"
cert = "tls/client.crt"
key = "tls/client.key"
MSG
