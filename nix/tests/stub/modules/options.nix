# Stand-in declarations of the NixOS options nix/module.nix reads or defines, typed as
# NixOS types them (in 2020 and now), plus a fake system.build.toplevel that fails on
# failed assertions like the real one and carries its configuration for inspection.
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  fake = import ../fake-drv.nix;

  unit = types.submodule {
    options = {
      description = mkOption { type = types.str; default = ""; };
      wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
      after = mkOption { type = types.listOf types.str; default = [ ]; };
      requires = mkOption { type = types.listOf types.str; default = [ ]; };
      wants = mkOption { type = types.listOf types.str; default = [ ]; };
      environment = mkOption { type = types.attrsOf types.str; default = { }; };
      path = mkOption { type = types.listOf types.package; default = [ ]; };
      preStart = mkOption { type = types.lines; default = ""; };
      postStop = mkOption { type = types.lines; default = ""; };
      script = mkOption { type = types.lines; default = ""; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
      serviceConfig = mkOption { type = types.attrsOf types.unspecified; default = { }; };
    };
  };

  activationScript = types.submodule {
    options = {
      deps = mkOption { type = types.listOf types.str; default = [ ]; };
      text = mkOption { type = types.lines; };
    };
  };

  failed = lib.filter (a: !a.assertion) config.assertions;
  fingerprint = builtins.toJSON {
    hydra = "${config.services.hydra.package}";
    activation = config.system.activationScripts.script;
    extra = map toString config.system.extraDependencies;
    units = lib.mapAttrs (_: u: [ u.preStart (u.serviceConfig.ExecStart or "") u.postStop ]) config.systemd.services;
    packages = map toString config.environment.systemPackages;
    specialisations = lib.attrNames config.specialisation;
  };
in
{
  options = {
    services.hydra = {
      enable = mkOption { type = types.bool; default = false; };
      package = mkOption { type = types.package; };
      dbi = mkOption { type = types.str; default = "dbi:Pg:dbname=hydra;user=hydra;"; };
      listenHost = mkOption { type = types.str; default = "*"; };
      port = mkOption { type = types.int; default = 3000; };
    };
    services.postgresql.enable = mkOption { type = types.bool; default = false; };
    # No default, as in nixpkgs: defined only while PostgreSQL is enabled.
    services.postgresql.package = mkOption { type = types.package; };
    systemd.package = mkOption { type = types.package; };
    nix.package = mkOption { type = types.package; };
    systemd.services = mkOption { type = types.attrsOf unit; default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    system.extraDependencies = mkOption { type = types.listOf types.package; default = [ ]; };
    # As nixos-20.09's: its apply keeps only the whole script, the fragments by name are
    # gone from the evaluated config (later releases keep both), so what reads the
    # activation must read `script`.
    system.activationScripts = mkOption {
      type = types.attrsOf activationScript;
      default = { };
      apply = set: { script = lib.concatMapStrings (a: a.text) (lib.attrValues set); };
    };
    system.build = mkOption { type = types.attrsOf types.unspecified; default = { }; };
    nixpkgs.initialSystem = mkOption { type = types.str; };
    specialisation = mkOption { type = types.attrsOf types.unspecified; default = { }; };
  };

  config = {
    # As nixpkgs' postgresql module (defined under mkIf enable) and Hydra's module (enables
    # PostgreSQL only for the default local DBI string) do.
    services.postgresql.package = lib.mkIf config.services.postgresql.enable config._module.args.pkgs.postgresql;
    services.postgresql.enable = lib.mkIf
      (config.services.hydra.enable && config.services.hydra.dbi == "dbi:Pg:dbname=hydra;user=hydra;") true;
    systemd.package = config._module.args.pkgs.systemd;
    nix.package = config._module.args.pkgs.nix;
    # The hydra module's own hydra-init (only the part that matters here).
    systemd.services = lib.mkIf config.services.hydra.enable {
      hydra-init.preStart = "mkdir -p /var/lib/hydra";
    };
    system.build.toplevel =
      if failed != [ ] then throw ("Failed assertions:\n- " + lib.concatMapStringsSep "\n- " (a: a.message) failed)
      else fake "nixos-system-stub" fingerprint // { inherit config; };
  };
}
