{
  description = "hydra-upgrade: carry a self-hosted Hydra through its two-phase jobset_id schema upgrade";

  inputs = {
    # Builds the tool (edition 2024 and let chains need rustc >= 1.88).
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    # A release with both pkgs.hydra-migration and pkgs.hydra-unstable: the VM test's
    # Hydra and the 2020 module-evaluation check.
    nixpkgs-2009.url = "github:NixOS/nixpkgs/nixos-20.09";
  };

  outputs = { self, nixpkgs, nixpkgs-2009 }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # A host on which Hydra and the module are enabled; shared by the eval checks.
      evalHost = { stateVersion, hydraPackages ? (pkgs: { }) }: { pkgs, ... }: {
        system.stateVersion = stateVersion;
        boot.loader.grub.device = "nodev";
        fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; };
        services.hydra = {
          enable = true;
          hydraURL = "http://localhost:3000";
          notificationSender = "hydra@localhost";
        };
        # walPrepare: the unit's ExecStartPre / ExecStopPost in a real NixOS system.
        services.hydra-upgrade = { enable = true; walPrepare = true; } // hydraPackages pkgs;
      };

      # Evaluates a NixOS system with the module and turns what matters into a file:
      # the toplevel and both phase systems must instantiate (assertions included) and
      # the configuration file must name both phase systems.
      moduleEvalCheck = name: nixosSystem: extra:
        let
          system = nixosSystem {
            system = "x86_64-linux";
            modules = [ self.nixosModules.default extra ];
          };
          c = system.config;
          drv = d: builtins.unsafeDiscardStringContext d.drvPath;
          summary = {
            toplevel = drv c.system.build.toplevel;
            migration = drv c.system.build.hydraUpgrade.migration;
            final = drv c.system.build.hydraUpgrade.final;
            hydraInitGuarded = lib.hasInfix "schema-guard.sh" c.systemd.services.hydra-init.preStart;
            # (20.09 keeps only the whole `script`, later releases the fragments too)
            activation = lib.hasInfix "hydra-upgrade-config.json" c.system.activationScripts.script;
            # (escapeShellArg quotes every word in 20.09's lib, only the unsafe ones now)
            walPrepare =
              let unquoted = s: lib.replaceStrings [ "'" ] [ "" ] s; u = c.systemd.services.hydra-upgrade;
              in lib.hasInfix "bin/hydra-upgrade wal prepare --db dbname=hydra" (unquoted u.preStart)
                && lib.hasInfix "bin/hydra-upgrade wal reset --db dbname=hydra" (unquoted u.postStop);
          };
        in
        assert summary.hydraInitGuarded && summary.activation && summary.walPrepare;
        assert summary.migration != summary.final && summary.migration != summary.toplevel;
        nixpkgs.legacyPackages.x86_64-linux.writeText "${name}.json" (builtins.toJSON summary);
    in
    {
      packages = forAllSystems (system: pkgs: rec {
        hydra-upgrade = pkgs.callPackage ./nix/package.nix { };
        default = hydra-upgrade;
      });

      apps = forAllSystems (system: pkgs:
        let
          app = {
            type = "app";
            program = "${self.packages.${system}.default}/bin/hydra-upgrade";
            # (recent `nix flake check` warns about an app without it)
            meta.description = "Carry a self-hosted Hydra through its jobset_id schema upgrade";
          };
        in { upgrade = app; default = app; });

      # Adds pkgs.hydra-upgrade. A nixpkgs whose Rust is too old for the crate (such as
      # nixos-20.09) gets the package built with this flake's nixpkgs instead.
      overlays.default = final: prev: {
        hydra-upgrade =
          if lib.versionAtLeast (prev.rustc.version or "0") "1.88"
          then final.callPackage ./nix/package.nix { }
          else self.packages.${prev.stdenv.hostPlatform.system}.default;
      };

      nixosModules.hydra-upgrade = {
        key = "hydra-upgrade#nixosModules.hydra-upgrade";
        _file = "${toString ./flake.nix}#nixosModules.hydra-upgrade";
        imports = [
          ./nix/module.nix
          ({ lib, pkgs, ... }: {
            services.hydra-upgrade.package = lib.mkDefault
              (pkgs.hydra-upgrade or self.packages.${pkgs.stdenv.hostPlatform.system}.default);
          })
        ];
      };
      nixosModules.default = self.nixosModules.hydra-upgrade;

      checks.x86_64-linux = {
        package = self.packages.x86_64-linux.default;

        vm-test = import ./nix/vm-test.nix {
          nixpkgs = nixpkgs-2009;
          system = "x86_64-linux";
          hydraUpgradeModule = self.nixosModules.default;
          hydraUpgradePackage = self.packages.x86_64-linux.default;
        };

        # nixos-20.09: no extendModules, phase systems via eval-config.nix; the packages
        # are nixpkgs' own defaults (pkgs.hydra-migration, pkgs.hydra-unstable).
        module-eval-2009 = moduleEvalCheck "module-eval-2009" nixpkgs-2009.lib.nixosSystem
          (evalHost { stateVersion = "20.09"; });

        # Current nixpkgs: phase systems via extendModules. It carries neither package,
        # so the check names the current Hydra for both: only the evaluation is tested.
        module-eval-current = moduleEvalCheck "module-eval-current" nixpkgs.lib.nixosSystem
          (evalHost {
            stateVersion = "25.11";
            hydraPackages = pkgs: { migrationPackage = pkgs.hydra; finalPackage = pkgs.hydra; };
          });
      };

      devShells = forAllSystems (system: pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.cargo pkgs.rustc pkgs.clippy pkgs.rustfmt pkgs.postgresql pkgs.nix ];
        };
      });
    };
}
