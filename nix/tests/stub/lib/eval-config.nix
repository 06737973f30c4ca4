# Stand-in for nixos/lib/eval-config.nix as nixos-20.09 has it (arguments system, pkgs,
# baseModules, modules, lib, specialArgs, ...; module arguments baseModules, modules,
# extraModules; modulesPath; nixpkgs.initialSystem). The module calls it on a lib without
# extendModules, exactly as it would call 20.09's.
{ system ? "x86_64-linux"
, pkgs ? null
, baseModules ? import ../modules/module-list.nix
, extraArgs ? { }
, specialArgs ? { }
, modules
, check ? true
, prefix ? [ ]
, lib
}:

let
  pkgs_ = pkgs;
  pkgsModule = {
    _file = ./eval-config.nix;
    key = ./eval-config.nix;
    config = {
      nixpkgs.initialSystem = system;
      _module.args = {
        inherit baseModules modules;
        extraModules = [ ];
        pkgs = lib.mkIf (pkgs_ != null) (lib.mkForce pkgs_);
      } // extraArgs;
    };
  };
in
lib.evalModules {
  inherit prefix check;
  modules = baseModules ++ [ pkgsModule ] ++ modules;
  specialArgs = { modulesPath = toString ../modules; } // specialArgs;
}
