# Stand-in for nixos/modules/module-list.nix: the option declarations the module
# touches, nothing else. Used as `baseModules` by eval-module.nix and by the
# eval-config.nix stand-in.
[ ./options.nix ./pkgs.nix ]
