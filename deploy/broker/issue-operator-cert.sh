#!/usr/bin/env bash
# Issue a client certificate for an operator service or app: NAME@ROLE.
#
#   issue-operator-cert.sh NAME@ROLE [--days N] [--out DIR] [--ca DIR] [--csr FILE]
#                          [--force]
#
# The certificate's CN, NAME@ROLE, becomes the MQTT username. The '@' keeps
# operator names apart from vehicle ids, which cannot contain it. The role is
# a naming convention only: the broker grants nothing until the ACL file has
# a `user NAME@ROLE` section for this exact name (deploy/broker/acl has
# examples per role). Give every connection its own name: the broker uses
# the name as the client id, so two connections with one name replace each
# other. Writes DIR/client.key, client.csr, client.crt and ca.crt (DIR
# defaults to ./operators/NAME@ROLE). See docs/fleet-broker.md.

# shellcheck source-path=SCRIPTDIR source=ca-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/ca-common.sh"

name=""
days=$DEFAULT_DAYS
out=""
csr=""
force=no
while [[ $# -gt 0 ]]; do
    case $1 in
        --days) need_value "$1" $#; valid_days "$2"; days=$2; shift 2 ;;
        --out) need_value "$1" $#; out=$2; shift 2 ;;
        --ca) need_value "$1" $#; FLEET_CA_DIR=$2; shift 2 ;;
        --csr) need_value "$1" $#; csr=$2; shift 2 ;;
        --force) force=yes; shift ;;
        -h|--help) usage ;;
        -*) printf 'unknown option: %s\n\n' "$1" >&2; usage 2 ;;
        *)
            [[ -z $name ]] || die "one name at a time (got '$name' and '$1')"
            name=$1; shift ;;
    esac
done
[[ -n $name ]] || usage 2
if ! valid_operator_name "$name"; then
    die "bad operator name '$name': expected NAME@ROLE, each part letters, digits," \
        "'_', '-' or '.', starting with a letter or digit (e.g. ingest-1@ingest)"
fi
[[ -z $csr || -f $csr ]] || die "--csr: no such file '$csr'"
require_ca
out=${out:-./operators/$name}

issue_client "$name" "$out" "$days" operator_cert "$csr" "$force"

cat <<MSG
issued $out/client.crt for '$name'. The broker grants it nothing until its ACL file has

user $name
topic read ...

(see deploy/broker/acl), then reload mosquitto (SIGHUP).
MSG
