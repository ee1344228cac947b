# Derivations the builder tests build. Builders use absolute paths: Nix gives
# them PATH=/path-not-set.
let
  sys = builtins.currentSystem;
  src = builtins.toFile "input.txt" "source-content\n";
  dep = derivation {
    name = "dep";
    system = sys;
    builder = "/bin/sh";
    args = [ "-c" "echo dep-content > $out" ];
  };
  mk = name: script: derivation {
    inherit name dep src;
    system = sys;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
in {
  inherit dep;
  top = mk "top" "echo building top; /bin/cat $dep $src > $out; echo $dep >> $out; echo hello >> $out";
  multi = derivation {
    name = "multi";
    system = sys;
    builder = "/bin/sh";
    outputs = [ "out" "dev" ];
    args = [ "-c" "echo dev-output > $dev; echo $dev > $out" ];
  };
  slow = mk "slow" "echo started; /bin/sleep 4321; /bin/touch $out";
  quiet = mk "quiet" "echo started; /bin/sleep 4322; /bin/touch $out";
  failing = mk "failing" "echo about to fail; exit 3";
  pause = mk "pause" "echo started; /bin/sleep 2; echo done > $out";
  stopme = mk "stopme" "echo started; /bin/sleep 4324; /bin/touch $out";
  cancelme = mk "cancelme" "echo started; /bin/sleep 4323; /bin/touch $out";
}
