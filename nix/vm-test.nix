# NixOS VM test: one Hydra VM at the pre-change Hydra (rev 2b4f1496, schema 57) with
# services.hydra-upgrade enabled; `hydra-upgrade upgrade --yes`, with no other flags,
# carries it through both phases. Modelled on nixpkgs' nixos/tests/hydra/db-migration.nix
# (2020), with the tool doing the work instead of hand-run steps.
#
# Built from nixos-20.09, a branch with both pkgs.hydra-migration and pkgs.hydra-unstable.
# Run: nix build .#checks.x86_64-linux.vm-test   (needs KVM and internet)
{ nixpkgs                 # nixos-20.09 source tree
, system ? "x86_64-linux"
, hydraUpgradeModule      # the flake's nixosModules.default
, hydraUpgradePackage     # the tool, built with the flake's current nixpkgs
}:

import "${nixpkgs}/nixos/tests/make-test-python.nix" ({ pkgs, lib, ... }:
let
  # The Hydra before the jobset_id change, as nixpkgs' migration test built it.
  oldHydra = pkgs.hydra-migration.overrideAttrs (old: {
    inherit (old) pname;
    version = "2020-02-06";
    src = pkgs.fetchFromGitHub {
      owner = "NixOS";
      repo = "hydra";
      rev = "2b4f14963b16b21ebfcd6b6bfa7832842e9b2afc";
      sha256 = "16q0cffcsfx5pqd91n9k19850c1nbh4vvbd9h8yi64ihn7v8bick";
    };
  });

  jobExpr = pkgs.writeTextDir "trivial.nix" ''
    {
      trivial = builtins.derivation {
        name = "trivial";
        system = "${system}";
        builder = "/bin/sh";
        allowSubstitutes = false;
        preferLocalBuild = true;
        args = [ "-c" "echo success > $out" ];
      };
    }
  '';

  # Project "trivial" with the evaluated jobset "trivial" and three disabled jobsets
  # "extra1..3" (never evaluated; the SQL below gives them Jobs and Builds rows).
  createProject = pkgs.writeShellScriptBin "create-hydra-project" ''
    set -euo pipefail
    export PATH=${lib.makeBinPath [ pkgs.curl pkgs.coreutils ]}:$PATH
    url=http://localhost:3000
    jar=$(mktemp)
    call() {
      curl -sS --fail --referer "$url" -b "$jar" -c "$jar" \
        -H 'Accept: application/json' -H 'Content-Type: application/json' \
        -X "$1" --data "$3" "$url$2"
      echo
    }
    call POST /login '{"username": "admin", "password": "admin"}'
    call PUT /project/trivial '{"displayname": "Trivial", "enabled": "1", "visible": "1"}'
    jobset() {
      call PUT "/jobset/trivial/$1" "$(printf '{"description": "%s", "checkinterval": "60", "enabled": "%s", "visible": "1", "keepnr": "1", "nixexprinput": "src", "nixexprpath": "trivial.nix", "inputs": {"src": {"value": "%s", "type": "path"}}}' "$1" "$2" "${jobExpr}")"
    }
    jobset trivial 1
    for n in 1 2 3; do jobset "extra$n" 0; done
  '';
in
{
  name = "hydra-upgrade";
  # nixos-20.09 runs `black --check` on test scripts; this one is not black-formatted.
  skipLint = true;

  nodes.machine = { config, pkgs, lib, ... }: {
    imports = [ hydraUpgradeModule ];

    virtualisation.memorySize = 2048;
    virtualisation.diskSize = 4096;
    # The tool sets the system profile like nixos-rebuild: the phase systems (part of
    # this system's closure) must be registered in the VM's Nix database.
    virtualisation.pathsInNixDB = [ config.system.build.toplevel ];
    # `switch-to-configuration switch` installs the boot loader; the test VM boots
    # without one, so there is none to install.
    boot.loader.grub.enable = false;
    time.timeZone = "UTC";

    environment.systemPackages = [ createProject pkgs.jq pkgs.curl ];

    services.hydra = {
      enable = true;
      package = oldHydra;
      hydraURL = "http://localhost:3000";
      notificationSender = "hydra@localhost";
    };
    nix = {
      distributedBuilds = true;
      buildMachines = [{ hostName = "localhost"; systems = [ system ]; }];
      binaryCaches = lib.mkForce [ ];
    };

    services.hydra-upgrade = {
      enable = true;
      package = hydraUpgradePackage;
      # migrationPackage and finalPackage: the defaults, pkgs.hydra-migration and
      # pkgs.hydra-unstable of nixos-20.09.
      # Slow enough that the kill subtest lands in the middle of the backfill.
      backfill = { targetBatchMs = 20; pauseMs = 200; };
      # The unit runs `wal prepare` before the upgrade and `wal reset` when it stops.
      walPrepare = true;
    };
  };

  testScript = { nodes, ... }:
    let
      m = nodes.machine.config;
      migration = m.system.build.hydraUpgrade.migration;
      final = m.system.build.hydraUpgrade.final;
      original = m.system.build.toplevel;
      finalHydra = m.services.hydra-upgrade.finalPackage;
    in ''
      import json
      import shlex


      def sql(query):
          """Run SQL as the PostgreSQL superuser on Hydra's database; stdout, stripped."""
          return machine.succeed(
              "runuser -u postgres -- psql -d hydra -tAX -v ON_ERROR_STOP=1 -c "
              + shlex.quote(query)
          ).strip()


      def running(system):
          machine.succeed(f"test \"$(readlink -f /run/current-system)\" = {system}")


      def hydra_healthy():
          for unit in ["hydra-init", "hydra-server", "hydra-queue-runner", "hydra-evaluator", "hydra-notify"]:
              machine.wait_for_unit(f"{unit}.service")
          machine.wait_for_open_port(3000)
          machine.wait_until_succeeds(
              "curl -sSf -H 'Accept: application/json' http://localhost:3000/build/1 | jq -e '.buildstatus == 0'"
          )


      start_all()
      machine.wait_for_unit("multi-user.target")
      machine.wait_for_unit("postgresql.service")
      machine.wait_for_unit("hydra-init.service")

      with subtest("the old Hydra (schema 57) builds build 1"):
          assert sql("SELECT version FROM schemaversion") == "57"
          machine.succeed("hydra-create-user admin --role admin --password admin")
          machine.wait_for_open_port(3000)
          machine.succeed("create-hydra-project >&2")
          hydra_healthy()
          assert "jobset_id" not in sql("SELECT string_agg(column_name, ',') FROM information_schema.columns WHERE table_name = 'jobs'")

      with subtest("a few thousand more Jobs and Builds rows, in modest statements"):
          sql(
              "INSERT INTO jobs (project, jobset, name) "
              "SELECT 'trivial', j.name, 'job-' || g FROM jobsets j, generate_series(1, 250) g "
              "WHERE j.project = 'trivial'"
          )
          # Builds' row trigger NrBuildsFinished updates one counter row per inserted
          # finished build: 16 statements of 500 rows rather than one of 8,000.
          for chunk in range(16):
              lo, hi = chunk * 125 + 1, chunk * 125 + 125
              sql(
                  "INSERT INTO builds (finished, timestamp, project, jobset, job, nixname, drvpath, "
                  "system, starttime, stoptime, buildstatus) "
                  "SELECT 1, 1600000000 + g, 'trivial', j.name, 'job-' || (1 + g % 250), 'synthetic-' || g, "
                  "'/nix/store/' || md5(j.name || g::text) || '-synthetic-' || g || '.drv', "
                  f"'${system}', 1600000000 + g, 1600000001 + g, 0 "
                  f"FROM jobsets j, generate_series({lo}, {hi}) g WHERE j.project = 'trivial'"
              )
          max_old = int(sql("SELECT max(id) FROM builds"))
          old_builds = int(sql("SELECT count(*) FROM builds"))
          assert old_builds >= 8000, old_builds
          assert int(sql("SELECT count(*) FROM jobs")) >= 1000

      with subtest("status before"):
          st = json.loads(machine.succeed("hydra-upgrade status --json"))
          assert st["schema_version"] == 57, st
          assert st["stage"] == "before_migration", st

      with subtest("wal prepare and wal reset by hand, as the postgres superuser"):
          # As README and docs/upgrade.md tell the admin (nixpkgs' own migration test
          # reaches Hydra's database as the postgres user the same way).
          report = json.loads(machine.succeed(
              "runuser -u postgres -- hydra-upgrade --json wal prepare --db dbname=hydra --pause-ms 0 | tail -n 1"
          ))
          # Schema 57: the whole of Jobs and Builds is still to be walked.
          assert report["expected_bytes"] > 0, report
          assert report["ready_after_bytes"] >= report["expected_bytes"], report
          assert sql("SELECT current_setting('checkpoint_timeout')") == "30min"
          # Any role's status tells; a role that is not a superuser is refused (exit 16).
          assert json.loads(machine.succeed("hydra-upgrade status --json"))["wal_prepared"]
          status, out = machine.execute("hydra-upgrade wal reset 2>&1")
          machine.log(out)
          assert status == 16, f"expected exit code 16 for the hydra role, got {status}"
          machine.succeed("runuser -u postgres -- hydra-upgrade wal reset --db dbname=hydra >&2")
          assert sql(
              "SELECT count(*) FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'"
          ) == "0"
          assert sql("SELECT current_setting('checkpoint_timeout')") == "5min"
          assert not json.loads(machine.succeed("hydra-upgrade status --json"))["wal_prepared"]

      with subtest("kill -9 during the backfill, then resume"):
          # The module's own unit runs the whole upgrade detached from this shell.
          machine.succeed("systemctl start --no-block hydra-upgrade.service")
          machine.succeed(
              "for i in $(seq 1 6000); do "
              "n=$(runuser -u postgres -- psql -d hydra -tAX -c "
              f"'SELECT count(*) FROM builds WHERE id <= {max_old} AND jobset_id IS NOT NULL' 2>/dev/null || echo 0); "
              "[ \"''${n:-0}\" -gt 0 ] && exit 0; sleep 0.1; done; exit 1"
          )
          # walPrepare: the unit's ExecStartPre prepared before the backfill began ...
          assert json.loads(machine.succeed("hydra-upgrade status --json"))["wal_prepared"]
          assert sql("SELECT current_setting('checkpoint_timeout')") == "30min"
          machine.succeed("systemctl kill --signal=SIGKILL hydra-upgrade.service")
          # (`is-active` fails for the whole run of a oneshot, "activating"): until the
          # unit has ended, its ExecStopPost included.
          machine.wait_until_succeeds(
              "systemctl show -p ActiveState --value hydra-upgrade.service | grep -qxE 'failed|inactive'"
          )
          # ... and its ExecStopPost resets however the unit ended, a kill -9 too.
          machine.wait_until_succeeds(
              "hydra-upgrade status --json | jq -e '.wal_prepared == false'"
          )
          assert sql("SELECT current_setting('checkpoint_timeout')") == "5min"
          left = int(sql("SELECT count(*) FROM builds WHERE jobset_id IS NULL"))
          assert left > 0, "the backfill ended before it was killed: raise backfill.pauseMs"
          assert sql("SELECT version FROM schemaversion") == "61"
          running("${migration}")
          st = json.loads(machine.succeed("hydra-upgrade status --json"))
          assert st["stage"] == "migration", st

      with subtest("a NULL row nothing can fill: the final switch is refused with exit code 7"):
          # An orphan (its jobset does not exist), as left by a broken foreign key or an
          # older writer; inserted with foreign keys off (replica role).
          sql(
              "SET session_replication_role = replica; "
              "INSERT INTO builds (finished, timestamp, project, jobset, job, nixname, drvpath, system, "
              "starttime, stoptime, buildstatus) VALUES (1, 1600000000, 'trivial', 'no-such-jobset', "
              "'job-1', 'orphan', '/nix/store/00000000000000000000000000000000-orphan.drv', "
              "'${system}', 1600000000, 1600000001, 0)"
          )
          status, out = machine.execute("hydra-upgrade upgrade --yes 2>&1")
          machine.log(out)
          assert status == 7, f"expected exit code 7, got {status}"
          assert int(sql("SELECT version FROM schemaversion")) < 65
          running("${migration}")
          sql("SET session_replication_role = replica; DELETE FROM builds WHERE jobset = 'no-such-jobset'")

      with subtest("hydra-upgrade upgrade --yes finishes the upgrade"):
          machine.succeed("hydra-upgrade upgrade --yes >&2")
          running("${final}")
          hydra_healthy()

      with subtest("the final schema"):
          version = int(sql("SELECT version FROM schemaversion"))
          shipped = int(machine.succeed(
              "ls ${finalHydra}/libexec/hydra/sql | sed -n 's/^upgrade-\\([0-9]*\\)\\.sql$/\\1/p' | sort -n | tail -1"
          ))
          assert version >= 65 and version == shipped, (version, shipped)
          for table in ["builds", "jobs"]:
              if sql(f"SELECT to_regclass('{table}') IS NOT NULL") != "t":
                  continue  # a final Hydra newer than 2020 may have dropped Jobs (upgrade-67)
              assert sql(
                  "SELECT is_nullable FROM information_schema.columns "
                  f"WHERE table_name = '{table}' AND column_name = 'jobset_id'"
              ) == "NO", f"{table}.jobset_id is still nullable"
              wrong = int(sql(
                  f"SELECT count(*) FROM {table} t LEFT JOIN jobsets j "
                  "ON j.project = t.project AND j.name = t.jobset "
                  "WHERE j.id IS DISTINCT FROM t.jobset_id"
              ))
              assert wrong == 0, f"{wrong} {table} rows have a wrong jobset_id"
          assert sql(
              "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
              "WHERE c.relname IN ('indexfinishedsuccessfulbuilds', 'indexbuildsonjobsetidfinishedid') "
              "AND i.indisvalid"
          ) == "2"
          assert int(sql(f"SELECT count(*) FROM builds WHERE id <= {max_old}")) == old_builds
          st = json.loads(machine.succeed("hydra-upgrade status --json"))
          assert st["stage"] == "final", st
          # Nothing left to do: a re-run succeeds and changes nothing.
          machine.succeed("hydra-upgrade upgrade --yes >&2")
          running("${final}")

      with subtest("the schema guard keeps the old Hydra off the new schema"):
          machine.execute("${original}/bin/switch-to-configuration test >&2")
          machine.wait_until_succeeds(
              "journalctl -u hydra-init.service | grep -q 'REFUSING to start Hydra'"
          )
          machine.fail("systemctl is-active --quiet hydra-init.service")
          machine.succeed("${final}/bin/switch-to-configuration test >&2")
          machine.succeed("systemctl start hydra-init hydra-server hydra-queue-runner hydra-evaluator hydra-notify")
          hydra_healthy()
          assert int(sql("SELECT version FROM schemaversion")) == version

      machine.shutdown()
    '';
}) {
  inherit system;
  pkgs = import nixpkgs { inherit system; config = { }; overlays = [ ]; };
}
