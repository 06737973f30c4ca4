# Stand-in for nixpkgs: `pkgs` with the few attributes the module uses. The
# `stub.pkgsVariant` option picks which Hydra packages this fake nixpkgs carries:
# "2009" (hydra-migration, hydra-unstable) or "current" (hydra-migration is a throwing
# alias, no hydra-unstable), as the real branches do.
{ config, lib, ... }:

let
  fake = import ../fake-drv.nix;
  pkg = name: fake name name;
  common = {
    writeText = name: text: fake name text // { inherit text; };
    bash = pkg "bash-5";
    postgresql = pkg "postgresql-11";
    util-linux = pkg "util-linux-2.36";
    coreutils = pkg "coreutils-8.32";
    systemd = pkg "systemd-246";
    nix = pkg "nix-2.3";
    hydra-upgrade = pkg "hydra-upgrade-0.1.0";
    hydra-old = pkg "hydra-2020-02-06" // { migration = true; };
    hydra-current = pkg "hydra-0-unstable-2025";
  };
  variants = {
    "2009" = common // {
      hydra-migration = pkg "hydra-migration-2020-02-10" // { migration = true; };
      hydra-unstable = pkg "hydra-unstable-2020-09-02";
    };
    current = common // {
      hydra-migration = throw "hydra-migration has been removed";
    };
  };
in
{
  options.stub.pkgsVariant = lib.mkOption { type = lib.types.enum [ "2009" "current" ]; default = "2009"; };
  config._module.args.pkgs = variants.${config.stub.pkgsVariant};
}
