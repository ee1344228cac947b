# Derivations whose .drv files are the ATerm test data (see README.md).
let
  system = "x86_64-linux";
  script = builtins.toFile "build.sh" "echo building > $out\n";
  dep = derivation {
    name = "dep";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo dep > $out" ];
  };
in
rec {
  inherit dep;

  simple = derivation {
    name = "simple";
    inherit system;
    builder = "/bin/sh";
    args = [ "-e" script ];
    inherit dep;
  };

  fixed-flat = derivation {
    name = "fixed-flat";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "printf hello > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };

  fixed-recursive = derivation {
    name = "fixed-recursive";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "mkdir $out; printf hello > $out/f" ];
    outputHashMode = "recursive";
    outputHash = "sha256-LdxqU5vh6QS+uqFC3AkzBtefh5VGngvn2Y1IbpCTpds=";
  };

  multi = derivation {
    name = "multi";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out; echo > $dev; echo > $lib" ];
    outputs = [ "out" "dev" "lib" ];
    inherit dep;
  };

  structured = derivation {
    name = "structured";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "cp .attrs.json $out" ];
    __structuredAttrs = true;
    requiredSystemFeatures = [ "kvm" "nixos-test" ];
    nested = { list = [ 1 2.5 true null "s" ]; deps = [ dep ]; };
  };

  features = derivation {
    name = "features";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
    requiredSystemFeatures = [ "big-parallel" ];
    preferLocalBuild = true;
  };

  escapes = derivation {
    name = "escapes";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo \"quoted\" 'single' \\backslash\\ > $out" ];
    text = "line one\nline \"two\"\ttabbed\r\nback\\slash \\n not a newline\n\n";
    unicode = "héllo wörld ✓";
    empty = "";
    dollar = "\${not interpolated}";
  };

  uses-multi = derivation {
    name = "uses-multi";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
    d = multi.dev;
    l = multi.lib;
    f = fixed-flat;
  };

  aarch64 = derivation {
    name = "aarch64-thing";
    system = "aarch64-darwin";
    builder = "/bin/bash";
    args = [ ];
    inherit dep;
  };
}
