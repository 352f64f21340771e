#!/usr/bin/env bash
# Create the fleet CA, and issue or renew the broker's server certificate.
#
#   make-ca.sh [--ca DIR] [--name NAME] [--days N]
#              [--server-dns NAME]... [--server-ip ADDR]... [--server-days N]
#
# Without --server-* options only the CA is created (an existing CA is kept).
# With them, a new key and certificate for the broker are written to
# DIR/broker/, replacing any earlier ones (that is how the broker's certificate
# is renewed). Run it on the machine that keeps the CA, not on the broker.
# See docs/fleet-broker.md.

# shellcheck source-path=SCRIPTDIR source=ca-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/ca-common.sh"

name="ev-gateway fleet CA"
days=3650
server_days=$DEFAULT_DAYS
dns=()
ips=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --ca) need_value "$1" $#; FLEET_CA_DIR=$2; shift 2 ;;
        --name) need_value "$1" $#; name=$2; shift 2 ;;
        --days) need_value "$1" $#; valid_days "$2"; days=$2; shift 2 ;;
        --server-days) need_value "$1" $#; valid_days "$2"; server_days=$2; shift 2 ;;
        --server-dns)
            need_value "$1" $#
            [[ $2 =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "--server-dns: bad name '$2'"
            dns+=("$2"); shift 2 ;;
        --server-ip)
            need_value "$1" $#
            [[ $2 =~ ^[0-9A-Fa-f:.]+$ ]] || die "--server-ip: bad address '$2'"
            ips+=("$2"); shift 2 ;;
        -h|--help) usage ;;
        *) printf 'unknown argument: %s\n\n' "$1" >&2; usage 2 ;;
    esac
done
[[ $name != */* ]] || die "--name must not contain '/'"

make_ca() {
    mkdir -p "$FLEET_CA_DIR/certs"
    chmod 0700 "$FLEET_CA_DIR"
    : > "$FLEET_CA_DIR/index.txt"
    echo 1000 > "$FLEET_CA_DIR/crlnumber"
    cat > "$FLEET_CA_DIR/openssl.cnf" <<CNF
# Written by make-ca.sh; the CA scripts depend on these sections.
[ca]
default_ca = fleet_ca

[fleet_ca]
dir = \$ENV::FLEET_CA_HOME
database = \$dir/index.txt
new_certs_dir = \$dir/certs
certificate = \$dir/ca.crt
private_key = \$dir/ca.key
crlnumber = \$dir/crlnumber
rand_serial = yes
default_md = sha256
default_days = $DEFAULT_DAYS
default_crl_days = $CRL_DAYS
policy = policy_cn
# A vehicle's new certificate (rotation) has the same name as its old one.
unique_subject = no
copy_extensions = none
email_in_dn = no

[policy_cn]
commonName = supplied

[req]
distinguished_name = req_dn
prompt = no

[req_dn]
CN = unused

[v3_ca]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[vehicle_cert]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[operator_cert]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
    new_key "$FLEET_CA_DIR/ca.key"
    ossl req -new -x509 -config "$FLEET_CA_DIR/openssl.cnf" -extensions v3_ca \
        -key "$FLEET_CA_DIR/ca.key" -subj "/CN=$name" -days "$days" \
        -out "$FLEET_CA_DIR/ca.crt" 2>/dev/null || die "could not create the CA certificate"
    chmod 0644 "$FLEET_CA_DIR/ca.crt"
    echo "created the fleet CA in $FLEET_CA_DIR (keep ca.key offline and backed up)"
}

server_cert() {
    local san="" entry
    for entry in "${dns[@]}"; do san+="${san:+,}DNS:$entry"; done
    for entry in "${ips[@]}"; do san+="${san:+,}IP:$entry"; done
    local b=$FLEET_CA_DIR/broker
    mkdir -p "$b"
    # Clients check the broker's name against the subjectAltName only.
    cat > "$b/server.ext" <<EXT
[server_cert]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EXT
    new_key "$b/server.key.new"
    openssl req -new -key "$b/server.key.new" -subj "/CN=${dns[0]:-${ips[0]}}" \
        -out "$b/server.csr" 2>/dev/null || die "could not create the broker's CSR"
    sign "$b/server.csr" "$b/server.crt" "${dns[0]:-${ips[0]}}" "$server_days" \
        server_cert "$b/server.ext"
    mv -f "$b/server.key.new" "$b/server.key"
    rm -f "$b/server.csr" "$b/server.ext"
    echo "issued the broker certificate for $san in $FLEET_CA_DIR/broker/"
}

if [[ -e $FLEET_CA_DIR/ca.key ]]; then
    require_ca
    echo "using the existing fleet CA in $FLEET_CA_DIR"
else
    make_ca
fi
if [[ ${#dns[@]} -gt 0 || ${#ips[@]} -gt 0 ]]; then
    server_cert
fi
[[ -f $FLEET_CA_DIR/crl.pem ]] || gen_crl
cat <<MSG
copy to the broker's /etc/mosquitto/fleet/: ca.crt crl.pem broker/server.crt broker/server.key
(server.key: owner root, group mosquitto, mode 0640)
MSG
