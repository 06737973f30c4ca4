# Evaluates nix/module.nix with lib.evalModules and stand-in NixOS option declarations
# (nix/tests/stub), without nixpkgs. Takes nixpkgs' lib as an argument:
#
#   nix-instantiate --eval --strict nix/tests/eval-module.nix --arg lib 'import /path/to/nixpkgs/lib'
#
# With a lib of 2021-11 or later the module builds its phase systems with
# extendModules; with a 2020 lib (nixos-20.09) it goes through eval-config.nix (the
# stand-in in stub/lib). Prints the list of checks that passed; throws on the first
# failing one.
{ lib }:

let
  baseModules = import ./stub/modules/module-list.nix;
  module = ../module.nix;

  evalSystem = modules: lib.evalModules {
    modules = baseModules ++ [
      {
        nixpkgs.initialSystem = "x86_64-linux";
        _module.args = { inherit baseModules modules; extraModules = [ ]; };
      }
    ] ++ modules;
    specialArgs = { modulesPath = toString ./stub/modules; };
  };

  # A host with Hydra and the module enabled, plus `extras` (modules).
  hostEval = extras: evalSystem ([
    module
    ({ pkgs, ... }: {
      services.hydra = { enable = true; package = pkgs.hydra-old; };
      services.hydra-upgrade.enable = true;
    })
  ] ++ extras);
  host = extras: (hostEval extras).config;

  tryToplevel = cfg: builtins.tryEval (builtins.seq cfg.system.build.toplevel.outPath true);
  hasInfix = infix: s: lib.hasInfix infix s;

  # --- the main case: nixos-20.09-like nixpkgs, Hydra before the change -------------
  mainEval = hostEval [{
    specialisation.mine = { configuration = { }; };
    services.hydra-upgrade.backfill = { strategy = "per-page"; pauseMs = 5; pinCpu = 1; };
  }];
  main = mainEval.config;
  top = main.system.build.toplevel;
  mig = main.system.build.hydraUpgrade.migration;
  fin = main.system.build.hydraUpgrade.final;
  migCfg = mig.config;
  finCfg = fin.config;
  settings = builtins.fromJSON main.system.build.hydraUpgradeConfig.text;
  allowedKeys = [ "db" "migration_system" "final_system" "state_dir" "hydra_url" "backfill" ];
  variant = v: extras: host ([{ stub.pkgsVariant = v; }] ++ extras);
  asMigration = variant "2009" [ ({ pkgs, ... }: { services.hydra.package = lib.mkForce pkgs.hydra-migration; }) ];
  asFinal = variant "2009" [ ({ pkgs, ... }: { services.hydra.package = lib.mkForce pkgs.hydra-unstable; }) ];
  currentBare = variant "current" [ ];
  currentSet = (evalSystem [
    module
    ({ pkgs, ... }: {
      stub.pkgsVariant = "current";
      services.hydra = { enable = true; package = pkgs.hydra-current; };
      services.hydra-upgrade = {
        enable = true;
        migrationPackage = pkgs.hydra-old;
        finalPackage = pkgs.hydra-current;
      };
    })
  ]).config;
  noHydra = (evalSystem [ module { services.hydra-upgrade.enable = true; services.hydra.package = (import ./stub/fake-drv.nix) "hydra" "x"; } ]).config;
  remoteDb = host [{ services.hydra.dbi = "dbi:Pg:db=hydra;host=db.example.org;port=5433;user=ci;"; services.hydra.listenHost = "::1"; services.hydra.port = 3001; }];
  noGuard = host [{ services.hydra-upgrade.schemaGuard = false; }];
  # walPrepare: on this machine's PostgreSQL, and with Hydra's DBI naming a port too.
  walLocal = host [{ services.hydra-upgrade.walPrepare = true; }];
  walPort = host [{
    services.hydra-upgrade.walPrepare = true;
    services.postgresql.enable = true;
    services.hydra.dbi = "dbi:Pg:database=ci;user=hydra;host=localhost;port=5433;password=x;";
  }];
  walRemote = (hostEval [{
    services.hydra-upgrade.walPrepare = true;
    services.hydra.dbi = "dbi:Pg:dbname=hydra;host=db.example.org;user=hydra;";
  }]).config;
  # escapeShellArg quotes every word in a 2020 lib and only the unsafe ones now.
  unquoted = s: lib.replaceStrings [ "'" ] [ "" ] s;
  disabled = (evalSystem [ module { services.hydra.enable = true; services.hydra.package = (import ./stub/fake-drv.nix) "hydra" "x"; } ]).config;

  checks = {
    "parent toplevel evaluates (assertions pass)" = (tryToplevel main).success;
    "three distinct systems" = lib.length (lib.unique [ "${top}" "${mig}" "${fin}" ]) == 3;
    "migration system runs the migration package" = "${migCfg.services.hydra.package}" == "${main.services.hydra-upgrade.migrationPackage}";
    "final system runs the final package" = "${finCfg.services.hydra.package}" == "${main.services.hydra-upgrade.finalPackage}";
    "parent keeps its own Hydra" = main.services.hydra.package.name == "hydra-2020-02-06";
    "defaults: hydra-migration and hydra-unstable of the 20.09 nixpkgs" =
      main.services.hydra-upgrade.migrationPackage.name == "hydra-migration-2020-02-10"
      && main.services.hydra-upgrade.finalPackage.name == "hydra-unstable-2020-09-02";

    "phase systems build no phase systems" = !(migCfg.system.build ? hydraUpgrade) && !(finCfg.system.build ? hydraUpgrade);
    "phase systems are marked" = migCfg.services.hydra-upgrade.internal.phase == "migration" && finCfg.services.hydra-upgrade.internal.phase == "final";
    "phase systems carry no warnings" = migCfg.warnings == [ ] && finCfg.warnings == [ ];
    "phase systems drop the parent's specialisations" = main.specialisation ? mine && migCfg.specialisation == { } && finCfg.specialisation == { };
    "phase systems leave the config file alone" =
      !(hasInfix "/etc/hydra-upgrade" migCfg.system.activationScripts.script)
      && !(hasInfix "/etc/hydra-upgrade" finCfg.system.activationScripts.script);
    "migration system keeps the final system in its closure" = map toString migCfg.system.extraDependencies == [ "${fin}" ];
    "parent keeps both in its closure" = map toString main.system.extraDependencies == [ "${mig}" "${fin}" ];
    "phase systems keep the schema guard" = hasInfix "schema-guard.sh" migCfg.systemd.services.hydra-init.preStart;

    "config names both phase systems" = settings.migration_system == "${mig}" && settings.final_system == "${fin}";
    "config carries the DBI string" = settings.db == "dbi:Pg:dbname=hydra;user=hydra;";
    "config: state dir, URL, backfill knobs" =
      settings.state_dir == "/var/lib/hydra-upgrade"
      && settings.hydra_url == "http://localhost:3000"
      && settings.backfill == { strategy = "per-page"; target_batch_ms = 20; pause_ms = 5; pin_cpu = "1"; max_replication_lag_mb = 128; };
    "config: CPU pinning is auto by default" =
      (builtins.fromJSON noGuard.system.build.hydraUpgradeConfig.text).backfill.pin_cpu == "auto";
    "config has only keys the tool accepts" = lib.all (k: lib.elem k allowedKeys) (lib.attrNames settings);
    "activation installs the config file and GC roots" =
      let t = main.system.activationScripts.script; in
      hasInfix "/etc/hydra-upgrade/config.json" t && hasInfix "${mig}" t && hasInfix "${fin}" t
      && hasInfix "/nix/var/nix/gcroots/hydra-upgrade" t;

    "tool installed" = lib.elem "hydra-upgrade-0.1.0" (map (p: p.name) main.environment.systemPackages);
    "hydra-upgrade.service runs the whole upgrade, never restarted by a switch" =
      let u = main.systemd.services.hydra-upgrade; in
      hasInfix "bin/hydra-upgrade upgrade --yes" u.serviceConfig.ExecStart
      && !u.restartIfChanged && u.serviceConfig.Type == "oneshot";
    "no unit named like the tool's transient backfill unit" = !(main.systemd.services ? hydra-upgrade-backfill);
    "the unit wants a local PostgreSQL, not a remote one's" =
      main.systemd.services.hydra-upgrade.wants == [ "postgresql.service" ]
      && remoteDb.systemd.services.hydra-upgrade.wants == [ ];
    "state dir created" = lib.elem "d /var/lib/hydra-upgrade 0700 root root -" main.systemd.tmpfiles.rules;

    "walPrepare off by default: the unit neither prepares nor resets" =
      let u = main.systemd.services.hydra-upgrade; in u.preStart == "" && u.postStop == "";
    "walPrepare: wal prepare before the upgrade and wal reset after it, as postgres, Hydra's database" =
      let u = walLocal.systemd.services.hydra-upgrade; in
      (tryToplevel walLocal).success
      && hasInfix "bin/runuser -u postgres -- " (unquoted u.preStart)
      && hasInfix "bin/hydra-upgrade wal prepare --db dbname=hydra" (unquoted u.preStart)
      && hasInfix "bin/runuser -u postgres -- " (unquoted u.postStop)
      && hasInfix "bin/hydra-upgrade wal reset --db dbname=hydra" (unquoted u.postStop)
      && !(hasInfix "user=" u.preStart) && !(hasInfix "user=" u.postStop);
    "walPrepare keeps the DBI's database name and port only (not Hydra's user, password, host)" =
      let u = walPort.systemd.services.hydra-upgrade; in
      (tryToplevel walPort).success
      && hasInfix "wal prepare --db dbname=ci port=5433" (unquoted u.preStart)
      && hasInfix "wal reset --db dbname=ci port=5433" (unquoted u.postStop)
      # one argument
      && hasInfix "'dbname=ci port=5433'" u.preStart && hasInfix "'dbname=ci port=5433'" u.postStop;
    "walPrepare without PostgreSQL on this machine: assertion" =
      !(tryToplevel walRemote).success
      && walRemote.systemd.services.hydra-upgrade.preStart != "";

    "hydra-init keeps its own preStart, guard appended" =
      let p = main.systemd.services.hydra-init.preStart; in
      hasInfix "mkdir -p /var/lib/hydra" p && hasInfix "schema-guard.sh" p
      && hasInfix "'connect_timeout=10 dbname=hydra user=hydra application_name=hydra-upgrade-guard'" p
      && hasInfix "hydra-2020-02-06" p;
    "guard converts a DBI string with db=, host, port" =
      hasInfix "'connect_timeout=10 dbname=hydra host=db.example.org port=5433 user=ci application_name=hydra-upgrade-guard'"
        remoteDb.systemd.services.hydra-init.preStart;
    "remote database (PostgreSQL not enabled here): the guard's psql comes from pkgs.postgresql" =
      hasInfix "postgresql-11/bin/psql" remoteDb.systemd.services.hydra-init.preStart;
    "URL from listenHost and port" = (builtins.fromJSON remoteDb.system.build.hydraUpgradeConfig.text).hydra_url == "http://[::1]:3001";
    "schemaGuard = false leaves hydra-init alone" = !(hasInfix "schema-guard.sh" noGuard.systemd.services.hydra-init.preStart);

    "warning names the next command (old Hydra)" =
      lib.length main.warnings == 1 && hasInfix "hydra-upgrade upgrade" (lib.head main.warnings);
    "warning for the intermediate package" =
      lib.length asMigration.warnings == 1 && hasInfix "intermediate Hydra" (lib.head asMigration.warnings);
    "no warning once the final package is configured" = asFinal.warnings == [ ];
    "final package configured: phase systems still built" = asFinal.system.build ? hydraUpgrade;

    "current nixpkgs without the packages: assertion, not a crash" =
      !(tryToplevel currentBare).success
      && currentBare.services.hydra-upgrade.migrationPackage == null
      && currentBare.services.hydra-upgrade.finalPackage == null;
    "current nixpkgs with the packages given" = (tryToplevel currentSet).success && currentSet.system.build ? hydraUpgrade;
    "Hydra disabled: assertion" = !(tryToplevel noHydra).success;
    "module disabled: nothing defined" =
      (tryToplevel disabled).success && !(disabled.systemd.services ? hydra-upgrade)
      && !(hasInfix "schema-guard.sh" disabled.systemd.services.hydra-init.preStart);
  };

  failed = lib.filter (name: !checks.${name}) (lib.attrNames checks);
  path = if (mainEval._module.args ? extendModules) then "extendModules (lib of 21.11 or later)" else "eval-config.nix (lib of 2020)";
in
if failed == [ ] then {
  phaseSystemsBuiltWith = path;
  passed = lib.attrNames checks;
}
else throw "module evaluation checks failed: ${lib.concatStringsSep "; " failed}"
