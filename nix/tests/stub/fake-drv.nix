# A value that looks like a derivation to the module system and to string
# interpolation, without nixpkgs: its store path is a hash of `seed`.
name: seed: {
  type = "derivation";
  inherit name;
  outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" "${name}|${seed}")}-${name}";
}
