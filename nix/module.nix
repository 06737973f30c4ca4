# NixOS module: services.hydra-upgrade
#
# Era constraint: this module must evaluate on nixos-20.09 (a release that carries both
# pkgs.hydra-migration and pkgs.hydra-unstable, as nixos-20.03 does) and on current
# nixpkgs. It therefore uses only lib functions that existed in 2020: mkOption,
# mkEnableOption, mkIf, mkMerge, mkOverride, mkAfter,
# types.{bool,str,package,nullOr,enum,ints.unsigned,path}, ...
# Not used on purpose: mkPackageOption (2022), literalExpression (2021; we pick
# `lib.literalExpression or lib.literalExample`), mdDoc, lib.getExe, lib.fileset.
# nix/tests/eval-module.nix evaluates it against both a 2020 and a current nixpkgs lib.
#
# What it does when enabled:
# - builds two phase systems from this very configuration, identical except for
#   services.hydra.package (migration package, final package), and makes them part of the
#   running system (closure, GC roots, config.system.build.hydraUpgrade.{migration,final});
# - writes /etc/hydra-upgrade/config.json (store paths of both phase systems, the DBI
#   string, the state directory, Hydra's URL, the backfill knobs) so that
#   `hydra-upgrade upgrade` on the host needs no flags;
# - installs the tool, declares hydra-upgrade.service (the whole upgrade, detached from
#   any SSH session, progress in the journal), with walPrepare also `wal prepare` before
#   it and `wal reset` after it, as PostgreSQL's superuser;
# - guards hydra-init against an older Hydra package starting on a newer schema;
# - assertions and warnings that name the next step.
{ config, lib, pkgs, options, modulesPath, ... }:

let
  inherit (lib)
    mkOption mkEnableOption mkIf mkMerge mkOverride mkAfter types
    optional optionalAttrs optionalString concatStringsSep replaceStrings
    removePrefix escapeShellArg;

  cfg = config.services.hydra-upgrade;
  hydraCfg = config.services.hydra;

  # literalExpression appeared in 21.11 and literalExample was removed later: take
  # whichever this nixpkgs has.
  literal = lib.literalExpression or lib.literalExample;

  # A package nixpkgs may or may not carry. Newer nixpkgs may define removed packages
  # as throwing aliases, which tryEval turns into "absent".
  fromPkgs = name:
    let r = builtins.tryEval (pkgs.${name} or null);
    in if r.success then r.value else null;

  pkgName = p: if p == null then "(none)" else p.name or "(unnamed package)";
  samePackage = a: b: a != null && b != null && "${a}" == "${b}";

  phase = cfg.internal.phase;
  isParent = phase == "none";

  # ---------------------------------------------------------------------------------
  # The phase systems.
  #
  # Each is this same configuration plus one module that overrides
  # services.hydra.package and marks the evaluation as a phase system. How the
  # configuration is re-evaluated depends on the era:
  #
  # - lib.evalModules of 21.11 and later puts `extendModules` into _module.args: extend
  #   the current evaluation with one more module. This is what nixpkgs' own
  #   `specialisation` uses today and keeps everything the caller passed (specialArgs,
  #   nixosSystem's extra modules, the test framework's modules).
  # - nixos-20.09 has no extendModules. Its own `specialisation` (and the older
  #   `nesting.clone`) re-runs nixos/lib/eval-config.nix with the `baseModules` and
  #   `modules` module arguments; we do the same. Known limitation of that era (shared
  #   with 20.09's specialisations): specialArgs given to nixosSystem are not carried
  #   over, so phase systems on 20.09 should not depend on them (use _module.args).
  #
  # Why not `specialisation` itself: a specialisation's toplevel is only reachable as
  # <parent toplevel>/specialisation/<name>, so the parent cannot name it in a file
  # (that would be a dependency cycle), while the tool needs store paths it can switch
  # to, resume with, and compare with /run/current-system. Building the systems here
  # gives plain store paths in both eras with one code path for the result.
  #
  # Recursion guard: the phase module sets services.hydra-upgrade.internal.phase, and
  # only the parent (phase "none") builds phase systems, writes the config file, emits
  # upgrade warnings or installs GC roots. Phase systems also drop the parent's own
  # specialisations (which would otherwise be rebuilt inside each phase system) and
  # their warnings (copies of the parent's, plus Hydra's "run hydra-backfill-ids"
  # warning for the migration package, which the tool replaces).
  # ---------------------------------------------------------------------------------
  phaseModule = name: package: keep: {
    services.hydra.package = mkOverride 10 package;
    services.hydra-upgrade.internal = { phase = name; inherit keep; };
    warnings = mkOverride 10 [ ];
  } // optionalAttrs (options ? specialisation) {
    specialisation = mkOverride 0 { };
  };

  extendModules = config._module.args.extendModules or null;

  evalPhase = module:
    if extendModules != null then
      extendModules { modules = [ module ]; }
    else
      import "${modulesPath}/../lib/eval-config.nix" {
        inherit lib pkgs;
        system = config.nixpkgs.initialSystem;
        baseModules = config._module.args.baseModules;
        modules = config._module.args.modules ++ [ module ];
      };

  canBuildPhases = cfg.migrationPackage != null && cfg.finalPackage != null;

  # The final system is built from the parent, not from inside the migration system; the
  # migration system only keeps a reference to it (forward only: parent -> migration ->
  # final), so that it stays in the closure of whatever the host runs mid-upgrade.
  finalSystem = (evalPhase (phaseModule "final" cfg.finalPackage [ ])).config.system.build.toplevel;
  migrationSystem = (evalPhase (phaseModule "migration" cfg.migrationPackage [ finalSystem ])).config.system.build.toplevel;

  hydraUrl =
    let
      host =
        if hydraCfg.listenHost == "*" || hydraCfg.listenHost == "0.0.0.0" || hydraCfg.listenHost == "::" then "localhost"
        else if lib.hasInfix ":" hydraCfg.listenHost then "[${hydraCfg.listenHost}]"
        else hydraCfg.listenHost;
    in "http://${host}:${toString hydraCfg.port}";

  # Keys and spelling exactly as the tool reads them (src/config.rs, unknown keys refused).
  settings = {
    db = hydraCfg.dbi;
    state_dir = cfg.stateDir;
    hydra_url = hydraUrl;
    backfill = {
      strategy = cfg.backfill.strategy;
      target_batch_ms = cfg.backfill.targetBatchMs;
      pause_ms = cfg.backfill.pauseMs;
      pin_cpu = toString cfg.backfill.pinCpu;
      max_replication_lag_mb = cfg.backfill.maxReplicationLagMb;
    };
  } // optionalAttrs canBuildPhases {
    migration_system = "${migrationSystem}";
    final_system = "${finalSystem}";
  };

  configFile = pkgs.writeText "hydra-upgrade-config.json" (builtins.toJSON settings);
  configPath = "/etc/hydra-upgrade/config.json";
  gcRootDir = "/nix/var/nix/gcroots/hydra-upgrade";

  # Hydra's Perl DBI string -> libpq keywords (DBD::Pg hands the part after "dbi:Pg:" to
  # libpq with ';' as separator and accepts db=/database= for dbname=).
  conninfoWords =
    let
      body = removePrefix "dbi:Pg:" hydraCfg.dbi;
      words = lib.filter (w: w != "") (lib.splitString ";" body);
      fix = w:
        if lib.hasPrefix "db=" w then "dbname=" + removePrefix "db=" w
        else if lib.hasPrefix "database=" w then "dbname=" + removePrefix "database=" w
        else w;
    in map fix words;
  # The guard gives up after 10 s on a server it cannot reach (unless the DBI string sets
  # its own connect_timeout, which comes later and wins), rather than holding hydra-init
  # for the TCP timeout before it lets it go on.
  conninfo = concatStringsSep " "
    ([ "connect_timeout=10" ] ++ conninfoWords ++ [ "application_name=hydra-upgrade-guard" ]);

  utilLinux = pkgs.util-linux or pkgs.utillinux;

  # services.postgresql.package has no default of its own: nixpkgs defines it only under
  # `mkIf services.postgresql.enable` (20.09 and current), and the Hydra module enables
  # PostgreSQL only for its default local DBI string. A Hydra whose database lives on
  # another host therefore gets the client from pkgs.postgresql (psql speaks to older and
  # newer servers alike).
  psqlPackage =
    if config.services.postgresql.enable
    then config.services.postgresql.package
    else pkgs.postgresql;

  guardCommand = concatStringsSep " " (map escapeShellArg [
    "${pkgs.bash}/bin/bash"
    "${./schema-guard.sh}"
    "${hydraCfg.package}"
    "${psqlPackage}/bin/psql"
    conninfo
    "${utilLinux}/bin/runuser"
    "${pkgName cfg.migrationPackage} (services.hydra-upgrade.migrationPackage) or a newer Hydra"
    "${pkgName cfg.finalPackage} (services.hydra-upgrade.finalPackage)"
  ]);

  upgradeCommand = "hydra-upgrade upgrade";

  # walPrepare: `hydra-upgrade wal prepare` / `wal reset` need a PostgreSQL superuser. On
  # this machine that is the OS user named by services.postgresql.superUser ("postgres"
  # since 17.09; the option is internal, hence the fallback), reaching Hydra's database
  # over the Unix socket by peer authentication (Hydra's module maps postgres to postgres
  # in its hydra-users ident map; nixpkgs' own Hydra migration test works as postgres so).
  # Of Hydra's DBI string only the database name and the port are kept: its user, password
  # and host are the hydra role's way in, not the superuser's.
  superUser = config.services.postgresql.superUser or "postgres";
  walConninfo = concatStringsSep " "
    (lib.filter (w: lib.hasPrefix "dbname=" w || lib.hasPrefix "port=" w) conninfoWords);
  walCommand = action: concatStringsSep " " (map escapeShellArg [
    "${utilLinux}/bin/runuser" "-u" superUser "--"
    "${cfg.package}/bin/hydra-upgrade" "wal" action "--db" walConninfo
  ]);
in
{
  options.services.hydra-upgrade = {
    enable = mkEnableOption "hydra-upgrade, the tool that carries Hydra through its two-phase jobset_id schema upgrade (schema 57 to 65)";

    package = mkOption {
      type = types.package;
      default = pkgs.hydra-upgrade or (throw ''
        services.hydra-upgrade.package: pkgs.hydra-upgrade does not exist. Import this
        module through the flake's nixosModules.default (which supplies the package), apply
        its overlays.default, or set services.hydra-upgrade.package yourself.'');
      defaultText = literal "pkgs.hydra-upgrade (the flake's nixosModules.default supplies the flake's package)";
      example = literal "hydra-upgrade.packages.x86_64-linux.default";
      description = "The hydra-upgrade package (the tool, binary bin/hydra-upgrade).";
    };

    migrationPackage = mkOption {
      type = types.nullOr types.package;
      default = fromPkgs "hydra-migration";
      defaultText = literal "pkgs.hydra-migration if this nixpkgs has it (nixos-20.03, nixos-20.09), else null";
      example = literal "pkgs.hydra-migration";
      description = ''
        The intermediate Hydra of the first phase (Hydra at add4f610, schema 61): its
        hydra-init adds Jobsets.id and the nullable jobset_id columns and its evaluator
        writes jobset_id on every new row. Must be set where nixpkgs has no
        pkgs.hydra-migration (it was removed after nixos-20.09).
      '';
    };

    finalPackage = mkOption {
      type = types.nullOr types.package;
      default = fromPkgs "hydra-unstable";
      defaultText = literal "pkgs.hydra-unstable if this nixpkgs has it, else null";
      example = literal "pkgs.hydra-unstable";
      description = ''
        The Hydra of the second phase (schema 65 or later), whose hydra-init makes
        jobset_id NOT NULL and adds the two indexes (hydra-upgrade does that online
        beforehand, so this hydra-init finds nothing left to do).
      '';
    };

    stateDir = mkOption {
      type = types.path;
      default = "/var/lib/hydra-upgrade";
      example = "/srv/hydra-upgrade";
      description = ''
        Where the tool keeps its small state file (the step reached, the system to roll
        back to, timings) and the backfill unit's environment file.
      '';
    };

    schemaGuard = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Whether hydra-init refuses to start a Hydra package that knows fewer schema
        versions than the database already has (the highest upgrade-N.sql in the
        package against SchemaVersion), with a message naming the package to deploy.
        A package that knows schema 61 is allowed on schema 62 to 65.
      '';
    };

    walPrepare = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        Whether hydra-upgrade.service runs `hydra-upgrade wal prepare` before the upgrade
        and `wal reset` when it stops (finished, failed or stopped), as PostgreSQL's
        superuser: the OS user services.postgresql.superUser over the Unix socket, with
        the database name and port of services.hydra.dbi. `prepare` raises min_wal_size,
        max_wal_size and checkpoint_timeout for the rest of the backfill and has PostgreSQL
        create the WAL segments it will write into beforehand, one at a time; without them
        a quiet Hydra's pg_wal makes Hydra's commits wait while PostgreSQL creates segments
        and checkpoints during the backfill. The cost: pg_wal holds about 1.25 x Jobs' and
        Builds' size until `reset`, and creating the segments holds Hydra's commits about
        once a segment while the unit starts (a minute at ten million builds). Off by
        default: it changes server settings for a while, which is the admin's call. Needs
        PostgreSQL on this machine (services.postgresql.enable); for a database on another
        host run both commands there as a superuser.
      '';
    };

    backfill = {
      strategy = mkOption {
        type = types.enum [ "auto" "per-page" "keyset" ];
        default = "auto";
        example = "keyset";
        description = ''
          How the backfill walks Builds: per-page (HOT updates, little bloat), keyset
          (primary-key ranges) or auto (per-page unless something defeats HOT updates).
        '';
      };

      targetBatchMs = mkOption {
        type = types.ints.unsigned;
        default = 20;
        example = 200;
        description = "Time each backfill transaction aims at, in milliseconds; batch sizes adapt to it.";
      };

      pauseMs = mkOption {
        type = types.ints.unsigned;
        default = 0;
        example = 20;
        description = "Pause between backfill transactions, in milliseconds (throttle for a busy server).";
      };

      pinCpu = mkOption {
        type = types.either (types.enum [ "auto" "off" ]) types.ints.unsigned;
        default = "auto";
        example = "off";
        description = ''
          Keep the backfill and its PostgreSQL server process on one CPU while it runs, so
          that Hydra's processes keep the others (hydra-upgrade backfill --pin-cpu): "auto"
          takes the CPU serving the fewest device interrupts, a number names the CPU, "off"
          leaves the scheduler alone. Applies only when PostgreSQL runs on this machine and
          there are at least two CPUs; otherwise the backfill runs unpinned and logs why.
        '';
      };

      maxReplicationLagMb = mkOption {
        type = types.ints.unsigned;
        default = 128;
        example = 512;
        description = ''
          Between its transactions the backfill (and before each VALIDATE and index build
          the online finalize) waits while a standby or logical subscriber
          streaming from this PostgreSQL has more than this many MB of WAL (at least two WAL
          segments) not yet stored, until it is within half of it
          (hydra-upgrade backfill --max-replication-lag-mb); a receiver that stores nothing
          for 5 minutes ends the run (exit 17, resumable; --replication-stall-secs). A standby left far behind makes
          the primary keep its WAL (a replication slot: pg_wal grows until the disk is
          full) or can no longer follow (no slot). A standby with a slot is seen through
          it; one without needs pg_read_all_stats granted to the role the tool connects
          as, and the backfill warns when it cannot see one. 0 never waits.
        '';
      };
    };

    internal = {
      phase = mkOption {
        type = types.enum [ "none" "migration" "final" ];
        default = "none";
        internal = true;
        visible = false;
        description = "Set by the module itself inside the phase systems it builds; never set it by hand.";
      };
      keep = mkOption {
        type = types.listOf types.package;
        default = [ ];
        internal = true;
        visible = false;
        description = "Systems a phase system keeps in its closure (the migration system keeps the final one).";
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = hydraCfg.enable;
          message = "services.hydra-upgrade.enable needs services.hydra.enable = true: it upgrades the database of this machine's Hydra.";
        }
        {
          assertion = cfg.migrationPackage != null;
          message = ''
            services.hydra-upgrade.migrationPackage is null: this nixpkgs has no
            pkgs.hydra-migration (only nixos-20.03 and nixos-20.09 carry it). Set it, e.g.
            to nixos-20.09's pkgs.hydra-migration.'';
        }
        {
          assertion = !cfg.walPrepare || config.services.postgresql.enable;
          message = ''
            services.hydra-upgrade.walPrepare needs PostgreSQL on this machine
            (services.postgresql.enable): the unit runs `hydra-upgrade wal prepare` as its
            superuser over the Unix socket. For Hydra's database on another host, run
            `hydra-upgrade wal prepare` and, after the upgrade, `wal reset` there as a
            superuser, and leave walPrepare off.'';
        }
        {
          assertion = cfg.finalPackage != null;
          message = ''
            services.hydra-upgrade.finalPackage is null: this nixpkgs has no
            pkgs.hydra-unstable. Set it to a Hydra that knows schema 65 or later.'';
        }
      ];

      environment.systemPackages = [ cfg.package ];

      systemd.tmpfiles.rules = [ "d ${cfg.stateDir} 0700 root root -" ];

      # The whole upgrade as a unit: `systemctl start --no-block hydra-upgrade` runs it
      # detached from any SSH session, `journalctl -fu hydra-upgrade` follows it. Never
      # restarted by a switch (the upgrade itself switches systems while it runs).
      systemd.services.hydra-upgrade = {
        description = "Carry Hydra through the jobset_id schema upgrade (hydra-upgrade upgrade)";
        after = [ "network.target" "postgresql.service" ];
        # A start by hand brings up a local PostgreSQL too (a remote one is not ours).
        wants = optional config.services.postgresql.enable "postgresql.service";
        restartIfChanged = false;
        stopIfChanged = false;
        environment = {
          HYDRA_UPGRADE_CONFIG = configPath;
          PGPASSFILE = "/var/lib/hydra/pgpass";
        };
        path = [ cfg.package config.systemd.package config.nix.package pkgs.coreutils ];
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${cfg.package}/bin/hydra-upgrade upgrade --yes";
          # SIGTERM lets the tool finish the open batch and exit 130; re-running resumes.
          KillMode = "mixed";
          TimeoutStopSec = "10min";
        };
        # walPrepare: ExecStartPre and ExecStopPost. A failed prepare fails the unit before
        # the upgrade starts; the reset runs however the unit ended (a later start resumes
        # the upgrade and prepares again for what is left of the backfill).
        preStart = mkIf cfg.walPrepare (walCommand "prepare");
        postStop = mkIf cfg.walPrepare (walCommand "reset");
      };

      systemd.services.hydra-init.preStart = mkIf cfg.schemaGuard (mkAfter ''
        ${guardCommand}
      '');
    }

    (mkIf isParent {
      # The tool reads this file after it has switched the host into a phase system,
      # too. A store file under environment.etc would be replaced by the phase system's
      # own /etc, which cannot name itself; so the parent writes it on activation and
      # the phase systems leave it alone.
      system.activationScripts.hydra-upgrade = {
        deps = [ "etc" ];
        text = ''
          mkdir -p /etc/hydra-upgrade ${gcRootDir}
          install -m 0644 ${configFile} ${configPath}.tmp
          mv -f ${configPath}.tmp ${configPath}
          ${if canBuildPhases then ''
            ln -sfn ${migrationSystem} ${gcRootDir}/migration-system
            ln -sfn ${finalSystem} ${gcRootDir}/final-system
          '' else ''
            rm -f ${gcRootDir}/migration-system ${gcRootDir}/final-system
          ''}
        '';
      };

      warnings = optional (canBuildPhases && !samePackage hydraCfg.package cfg.finalPackage) (
        if samePackage hydraCfg.package cfg.migrationPackage then ''
          services.hydra-upgrade: this configuration runs the intermediate Hydra
          (${pkgName hydraCfg.package}). Finish the jobset_id upgrade with `${upgradeCommand}`
          on this host (backfill, verify, final switch), then set
          services.hydra.package = ${pkgName cfg.finalPackage} (services.hydra-upgrade.finalPackage)
          in this configuration.''
        else ''
          services.hydra-upgrade: this configuration runs ${pkgName hydraCfg.package}, not the
          final Hydra (${pkgName cfg.finalPackage}). If Hydra's database is not at schema 65
          yet, run `${upgradeCommand}` on this host (`hydra-upgrade status` shows where it
          stands); afterwards set services.hydra.package = ${pkgName cfg.finalPackage}
          (services.hydra-upgrade.finalPackage) here, or the next rebuild goes back to an
          older Hydra, which the schema guard then refuses to start.''
      );
    })

    (mkIf (!isParent) {
      system.extraDependencies = cfg.internal.keep;
    })

    (mkIf (isParent && canBuildPhases) {
      system.extraDependencies = [ migrationSystem finalSystem ];
      # `hydra-upgrade upgrade --flake .#host` builds exactly these two attributes.
      system.build.hydraUpgrade = {
        migration = migrationSystem;
        final = finalSystem;
      };
    })

    (mkIf isParent {
      system.build.hydraUpgradeConfig = configFile;
    })
  ]);
}
