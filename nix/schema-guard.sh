# hydra-upgrade schema guard, run at the end of hydra-init's preStart (see module.nix).
#
# Refuses to let a Hydra package start against a database whose SchemaVersion is newer
# than the package knows. Hydra's own hydra-init never lowers SchemaVersion and simply
# runs in that case; an older evaluator then writes rows the newer schema does not expect
# (NULL jobset_id, or failed inserts once the column is NOT NULL).
#
# Usage: bash schema-guard.sh HYDRA_PACKAGE PSQL CONNINFO RUNUSER MIGRATION_NAME FINAL_NAME
#   HYDRA_PACKAGE   store path of services.hydra.package (ships libexec/hydra/sql/upgrade-N.sql,
#                   the same files hydra-init reads through HYDRA_HOME)
#   PSQL            path of psql
#   CONNINFO        libpq keyword string derived from services.hydra.dbi
#   RUNUSER         path of runuser, used to connect as the hydra user when run as root ("" = no)
#   MIGRATION_NAME  what to tell the admin to deploy for schema 59..61
#   FINAL_NAME      what to tell the admin to deploy for schema 62 and later
set -u

pkg=$1 psql=$2 conninfo=$3 runuser=$4 migration_name=$5 final_name=$6
sqldir=$pkg/libexec/hydra/sql

say() { echo "hydra-upgrade schema guard: $*" >&2; }

# The highest upgrade-N.sql the package ships, exactly as hydra-init computes its target.
max=0
for f in "$sqldir"/upgrade-[0-9]*.sql; do
    [ -e "$f" ] || continue
    n=${f##*/upgrade-}
    n=${n%.sql}
    case $n in *[!0-9]*|'') continue ;; esac
    if [ "$n" -gt "$max" ]; then max=$n; fi
done
if [ "$max" -eq 0 ]; then
    say "$pkg ships no $sqldir/upgrade-N.sql; not a Hydra package this guard understands, skipping"
    exit 0
fi

query() {
    if [ -n "$runuser" ] && [ "$(id -u)" = 0 ]; then
        "$runuser" -u hydra -- "$psql" "$conninfo" -tAX -v ON_ERROR_STOP=1 -c "$1"
    else
        "$psql" "$conninfo" -tAX -v ON_ERROR_STOP=1 -c "$1"
    fi
}

# Cannot look: let hydra-init run and report the connection problem itself.
if ! present=$(query "SELECT to_regclass('schemaversion') IS NOT NULL"); then
    say "cannot read the schema version (see the psql error above); not blocking hydra-init"
    exit 0
fi
if [ "$present" != t ]; then
    say "no SchemaVersion table yet (fresh database): hydra-init will load schema $max"
    exit 0
fi
if ! stored=$(query "SELECT max(version) FROM schemaversion") || [ -z "$stored" ]; then
    say "cannot read SchemaVersion; not blocking hydra-init"
    exit 0
fi
case $stored in *[!0-9]*) say "unexpected schema version '$stored'; not blocking hydra-init"; exit 0 ;; esac

if [ "$stored" -le "$max" ]; then
    say "database schema $stored, package knows up to $max: ok"
    exit 0
fi

# One known-safe exception: a package that knows 61 (hydra-migration) writes jobset_id on
# every new row, so the jobset_id contract steps 62..65 (NOT NULL, two indexes) do not
# break it. hydra-upgrade relies on this to roll back from a failed final switch.
if [ "$max" -ge 61 ] && [ "$stored" -le 65 ]; then
    say "database schema $stored, package knows up to $max: allowed (62..65 only tighten jobset_id, which this package writes)"
    exit 0
fi

if [ "$stored" -le 61 ]; then
    want=$migration_name
else
    want=$final_name
fi
say "REFUSING to start Hydra: the database is at schema version $stored, but the configured"
say "services.hydra.package ($pkg) only knows schema versions up to $max."
say "An older Hydra would write rows the newer schema does not expect (NULL jobset_id)."
say "Deploy a Hydra that knows schema $stored: set services.hydra.package = $want"
say "and rebuild (or run 'hydra-upgrade status' to see where the upgrade stands)."
say "To bypass this check deliberately: services.hydra-upgrade.schemaGuard = false."
exit 1
