#!/usr/bin/env bash
# Nix checks that need no nixpkgs (CI on the development machines calls this):
#  1. `nix-instantiate --parse` on every tracked .nix file;
#  2. the 2020-compatibility rule of nix/module.nix (no lib function newer than 2020);
#  3. the schema guard script against a fake package and psql;
#  4. nix/module.nix evaluated with lib.evalModules and stand-in NixOS options
#     (nix/tests/eval-module.nix), against the nixpkgs lib named by NIXPKGS_LIB
#     (a lib/ directory, or a nixpkgs / nixpkgs.lib checkout that contains one);
#     NIXPKGS_LIB may list several, separated by ':' (e.g. a 2020 lib and a current one).
#     Without NIXPKGS_LIB this step is skipped, saying so, and does not fail.
# What needs nixpkgs and internet (nix flake check, the VM test) is in docs/nix.md.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nix-instantiate >/dev/null || { echo "nix/check.sh: nix-instantiate not found (apt-get install nix-bin)" >&2; exit 1; }

echo "nix/check.sh: parsing .nix files"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t files < <(git ls-files -- '*.nix')
else
    mapfile -t files < <(find . -name '*.nix' -not -path './target/*' | sort)
fi
for f in "${files[@]}"; do
    nix-instantiate --parse "$f" >/dev/null
    echo "  ok $f"
done

echo "nix/check.sh: nix/module.nix uses only lib functions that existed in 2020"
# literalExpression is allowed only as `lib.literalExpression or lib.literalExample`.
if grep -nE 'mkPackageOption|mdDoc|literalMD|getExe|mkRenamedOptionModuleWith|lib\.fileset|types\.attrsWith|types\.pathWith|extendModules *\{' nix/module.nix \
    | grep -v '^[0-9]*: *#' | grep -vE 'extendModules \{ modules = \[ module \]; \}'; then
    echo "nix/check.sh: nix/module.nix uses a lib function newer than nixos-20.09 (see above)" >&2
    exit 1
fi
if grep -n 'literalExpression' nix/module.nix | grep -v '^[0-9]*: *#' | grep -v 'literalExpression or lib.literalExample'; then
    echo "nix/check.sh: use \`lib.literalExpression or lib.literalExample\` (20.09 has no literalExpression)" >&2
    exit 1
fi
echo "  ok"

echo "nix/check.sh: shell scripts"
for f in nix/*.sh nix/tests/*.sh; do bash -n "$f"; echo "  ok (bash -n) $f"; done
bash nix/tests/schema-guard-test.sh | sed 's/^/  /'

echo "nix/check.sh: module evaluation against nixpkgs' lib"
if [ -z "${NIXPKGS_LIB:-}" ]; then
    echo "  SKIPPED: NIXPKGS_LIB is not set, so nixpkgs' lib is not available here and the module"
    echo "  was not evaluated. To run it: NIXPKGS_LIB=/path/to/nixpkgs.lib (a nix-community/"
    echo "  nixpkgs.lib checkout, or its lib/ directory) bash nix/check.sh"
    exit 0
fi
IFS=: read -r -a libs <<<"$NIXPKGS_LIB"
for l in "${libs[@]}"; do
    [ -f "$l/lib/default.nix" ] && l=$l/lib
    [ -f "$l/default.nix" ] || { echo "nix/check.sh: $l is not a nixpkgs lib directory" >&2; exit 1; }
    l=$(cd "$l" && pwd)
    out=$(nix-instantiate --eval --strict --json nix/tests/eval-module.nix --arg lib "import $l")
    python3 - "$l" "$out" <<'PY' 2>/dev/null || echo "  ok ($l): $out"
import json, sys
r = json.loads(sys.argv[2])
print(f"  ok ({sys.argv[1]}): {len(r['passed'])} checks passed; phase systems built with {r['phaseSystemsBuiltWith']}")
PY
done
