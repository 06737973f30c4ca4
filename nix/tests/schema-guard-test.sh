#!/usr/bin/env bash
# Runs nix/schema-guard.sh against a fake Hydra package and a fake psql: no database,
# no nixpkgs. Usage: bash nix/tests/schema-guard-test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
guard=$here/../schema-guard.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fake_pkg() { # fake_pkg NAME MAX: a package shipping upgrade-2..MAX.sql
    mkdir -p "$tmp/$1/libexec/hydra/sql"
    for n in $(seq 2 "$2"); do : > "$tmp/$1/libexec/hydra/sql/upgrade-$n.sql"; done
    : > "$tmp/$1/libexec/hydra/sql/hydra.sql"
}
fake_pkg old 57
fake_pkg migration 61
fake_pkg final 65
mkdir -p "$tmp/notHydra"

# psql stand-in: answers from FAKE_PRESENT / FAKE_VERSION, fails if FAKE_DOWN is set.
cat > "$tmp/psql" <<'PSQL'
#!/usr/bin/env bash
[ -n "${FAKE_DOWN:-}" ] && { echo "psql: could not connect" >&2; exit 2; }
case "$*" in
  *to_regclass*) echo "${FAKE_PRESENT:-t}" ;;
  *schemaversion*) echo "${FAKE_VERSION}" ;;
esac
PSQL
chmod +x "$tmp/psql"

fails=0
expect() { # expect CODE PKG VERSION [PRESENT] [DOWN] -- message grep
    local code=$1 pkg=$2 version=$3 present=${4:-t} down=${5:-} want=${6:-}
    local out rc=0
    out=$(FAKE_VERSION=$version FAKE_PRESENT=$present FAKE_DOWN=$down \
        bash "$guard" "$tmp/$pkg" "$tmp/psql" "dbname=hydra user=hydra" "" "hydra-migration" "hydra-unstable" 2>&1) || rc=$?
    if [ "$rc" != "$code" ] || { [ -n "$want" ] && ! grep -q -- "$want" <<<"$out"; }; then
        echo "FAIL: $pkg on schema $version (present=$present down=$down): exit $rc, wanted $code${want:+ and '$want'}"
        echo "$out" | sed 's/^/    /'
        fails=$((fails + 1))
    else
        echo "ok: $pkg on schema $version (present=$present${down:+, db down}): exit $rc"
    fi
}

expect 0 old 57
expect 0 old 10
expect 1 old 58 t "" "services.hydra.package = hydra-migration"
expect 1 old 61 t "" "only knows schema versions up to 57"
expect 1 old 65 t "" "services.hydra.package = hydra-unstable"
expect 0 migration 57
expect 0 migration 61
expect 0 migration 65 t "" "allowed"
expect 1 migration 66 t "" "services.hydra.package = hydra-unstable"
expect 0 final 65
expect 0 final 61
expect 0 old 0 f "" "fresh database"
expect 0 old 99 t 1 "not blocking"
expect 0 notHydra 80 t "" "skipping"

[ "$fails" -eq 0 ] || { echo "schema guard: $fails case(s) failed"; exit 1; }
echo "schema guard: all cases passed"
