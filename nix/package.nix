# The hydra-upgrade package. Needs a nixpkgs whose Rust knows edition 2024 and let
# chains (rustc >= 1.88): the flake builds it from its own `nixpkgs` input.
{ lib, rustPlatform, postgresql, util-linux }:

let
  root = ./..;
  cargoToml = builtins.fromTOML (builtins.readFile (root + "/Cargo.toml"));
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  version = cargoToml.package.version;

  # Only what cargo and the tests need: a change to docs/ or nix/ does not rebuild. (The
  # README is in: a unit test checks its table of exit codes against the code.)
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/README.md")
      (root + "/src")
      (lib.fileset.maybeMissing (root + "/tests"))
      (lib.fileset.maybeMissing (root + "/benches"))
      (lib.fileset.maybeMissing (root + "/build.rs"))
    ];
  };

  cargoLock.lockFile = root + "/Cargo.lock";

  # The test suite starts throwaway PostgreSQL clusters (initdb, pg_ctl, postgres,
  # pg_dump, pg_trgm) in temporary directories. The build user is not root, so initdb
  # runs directly. Tests that fake a NixOS host use sh from the build environment, and
  # setsid (util-linux, not in stdenv) for the fake systemd-run's units. .ci/unprivileged
  # runs the suite with a PATH of just these and stdenv's programs.
  nativeCheckInputs = [ postgresql util-linux ];
  doCheck = true;
  # The throwaway clusters need a short socket directory and no locale surprises.
  preCheck = ''
    export LC_ALL=C
    export TMPDIR=''${TMPDIR:-/tmp}
  '';

  # The benchmark binary keeps a name that cannot clash in a system profile.
  postInstall = ''
    if [ -e $out/bin/bench ]; then mv $out/bin/bench $out/bin/hydra-upgrade-bench; fi
  '';

  meta = {
    description = "Carries a self-hosted Hydra through its two-phase jobset_id schema upgrade";
    mainProgram = "hydra-upgrade";
    platforms = lib.platforms.linux;
  };
}
